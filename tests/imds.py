"""A strict fake EC2 instance metadata service (IMDS) for balanced.py's tests.

Point botocore/balanced.py at it with AWS_EC2_METADATA_SERVICE_ENDPOINT=<FakeIMDS.endpoint>.

Modes (settable at any time via `mode`):
* "v2" (default): PUT /latest/api/token (needs X-aws-ec2-metadata-token-ttl-seconds 1..21600)
  returns a token; GETs need a valid X-aws-ec2-metadata-token, else 401.
* "v1": no token endpoint (PUT -> 404); GETs work without a token.
* "hang": accepts connections and never answers until stop().
* "expire": the first token issued is rejected once with 401 (as if it expired); later tokens work.
* "forbidden": 403 for everything (IMDS disabled / not allowed).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MODES = ("v2", "v1", "hang", "expire", "forbidden")


class FakeIMDS:
    def __init__(
        self, instance_id: str = "i-0123456789abcdef0", region: str = "us-east-1", mode: str = "v2"
    ) -> None:
        self.instance_id = instance_id
        self.region = region
        self.availability_zone: str | None = None  # default: region + "a"
        self.account_id = "123456789012"
        self.mode = mode
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self._tokens: dict[str, float] = {}  # token -> expiry (time.monotonic())
        self.issued_tokens: list[str] = []  # every token handed out, for leak checks
        self._first_token: str | None = None
        self._first_token_rejected = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # releases "hang" handlers on stop()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeIMDS:
        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-imds", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeIMDS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ------------------------------------------------------------------------------

    @property
    def az(self) -> str:
        return self.availability_zone or f"{self.region}a"

    def identity_document(self) -> dict[str, Any]:
        return {
            "accountId": self.account_id,
            "architecture": "x86_64",
            "availabilityZone": self.az,
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": "ami-12c6146b",
            "instanceId": self.instance_id,
            "instanceType": "t3.micro",
            "kernelId": None,
            "pendingTime": "2024-01-01T00:00:00Z",
            "privateIp": "10.0.0.10",
            "ramdiskId": None,
            "region": self.region,
            "version": "2017-09-30",
        }

    def document(self, path: str) -> str | None:
        """Body for a GET path, or None (404)."""
        docs = {
            "/latest/meta-data/instance-id": self.instance_id,
            "/latest/meta-data/placement/region": self.region,
            "/latest/meta-data/placement/availability-zone": self.az,
            "/latest/dynamic/instance-identity/document": json.dumps(self.identity_document(), indent=2),
        }
        return docs.get(path)

    # -- tokens -------------------------------------------------------------------------------

    def issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        self.issued_tokens.append(token)
        with self._lock:
            self._tokens[token] = time.monotonic() + ttl
            if self._first_token is None:
                self._first_token = token
        return token

    def token_ok(self, token: str | None) -> bool:
        with self._lock:
            if token is None or self._tokens.get(token, 0) < time.monotonic():
                return False
            if self.mode == "expire" and token == self._first_token and not self._first_token_rejected:
                # Simulate the token expiring under the client: reject it (once, and for good).
                self._first_token_rejected = True
                del self._tokens[token]
                return False
            return True


def _make_handler(imds: FakeIMDS) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # requests are recorded in imds.requests instead

        def do_GET(self) -> None:
            self._handle("GET")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def do_POST(self) -> None:
            self._handle("POST")

        def _handle(self, method: str) -> None:
            imds.requests.append((method, self.path, dict(self.headers.items())))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if imds.mode == "hang":
                imds._stopping.wait()  # never answer; stop() releases us
                self.close_connection = True
                return
            if imds.mode == "forbidden":
                self._reply(403, "Forbidden")
            elif method == "PUT" and self.path == "/latest/api/token" and imds.mode != "v1":
                self._put_token()
            elif method != "GET":
                self._reply(404, "Not Found")
            else:
                self._get()

        def _put_token(self) -> None:
            if self.headers.get("X-Forwarded-For"):
                self._reply(403, "Forbidden")
                return
            ttl = self.headers.get(TOKEN_TTL_HEADER)
            if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                self._reply(400, "Bad Request")
                return
            token = imds.issue_token(int(ttl))
            self._reply(200, token, {TOKEN_TTL_HEADER: ttl})

        def _get(self) -> None:
            if imds.mode != "v1" and not imds.token_ok(self.headers.get(TOKEN_HEADER)):
                self._reply(401, "Unauthorized")
                return
            body = imds.document(self.path)
            if body is None:
                self._reply(404, "Not Found")
            else:
                self._reply(200, body)

        def _reply(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler
