"""A fault-injecting HTTP proxy between balanced.py and the local AWS.

It forwards every request to the upstream endpoint, except that, at configurable rates, it
answers with a throttling error in the AWS query-protocol format, a bare 500 or 503, answers
slowly, or drops the connection without answering: what AWS and the network do on a bad day."""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

THROTTLE_BODY = (
    "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>"
    "<Message>Rate exceeded</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>"
)
SERVER_ERROR_BODY = (
    "<ErrorResponse><Error><Type>Receiver</Type><Code>{code}</Code>"
    "<Message>injected by the fault proxy</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>"
)


@dataclass
class Faults:
    """Rates are probabilities per request, tried in this order; the rest pass through."""

    throttle: float = 0.0
    error_500: float = 0.0
    error_503: float = 0.0
    drop: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 0.5
    fail_everything: bool = False  # every request answered 503
    fail_after_action: str | None = None  # pass until this action succeeded once, then fail all
    tripped_code: str = "ServiceUnavailable"  # ...with this AWS error code
    tripped_status: int = 503
    lose_answer_of: str | None = None  # forward this action once, then drop AWS's answer
    seed: int = 0


@dataclass
class Tally:
    forwarded: int = 0
    injected: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1


class FaultProxy:
    """Context manager; `endpoint` is what balanced.py gets as AWS_ENDPOINT_URL."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.faults = faults or Faults()
        self.tally = Tally()
        self._rng = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self._tripped = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def choose(self) -> str:
        """The fault for the next request, or "pass"."""
        f = self.faults
        with self._lock:
            if self._tripped:
                kind = "tripped"
            elif f.fail_everything:
                kind = "503"
            else:
                roll = self._rng.random()
                kind = "pass"
                for name, rate in (
                    ("throttle", f.throttle),
                    ("500", f.error_500),
                    ("503", f.error_503),
                    ("drop", f.drop),
                    ("slow", f.slow),
                ):
                    if roll < rate:
                        kind = name
                        break
                    roll -= rate
            if kind not in ("pass", "slow"):
                self.tally.count(kind)
            return kind

    def loses_answer(self, action: str) -> bool:
        with self._lock:
            if action and action == self.faults.lose_answer_of:
                self.faults.lose_answer_of = None
                self.tally.count("lost answer")
                return True
            return False

    def saw_success(self, action: str) -> None:
        with self._lock:
            if action == self.faults.fail_after_action:
                self._tripped = True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
                pass

            def do_POST(self) -> None:  # noqa: N802 - stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                kind = proxy.choose()
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if kind == "throttle":
                    return self.answer(400, THROTTLE_BODY)
                if kind in ("500", "503"):
                    code = "InternalFailure" if kind == "500" else "ServiceUnavailable"
                    return self.answer(int(kind), SERVER_ERROR_BODY.format(code=code))
                if kind == "tripped":
                    f = proxy.faults
                    return self.answer(f.tripped_status, SERVER_ERROR_BODY.format(code=f.tripped_code))
                if kind == "slow":
                    time.sleep(proxy.faults.slow_seconds)
                self.forward(body)

            do_GET = do_POST  # noqa: N815 - stdlib's name

            def forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                action = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("Action", [""])[0]
                if proxy.loses_answer(action):  # AWS did it; the caller never hears so
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                with proxy._lock:
                    proxy.tally.forwarded += 1
                if resp.status == 200:
                    proxy.saw_success(action)
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def answer(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
