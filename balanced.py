#!/usr/bin/env python3
"""balanced: take this EC2 instance out of its load balancers, and put it back, safely.

Runs on the instance itself, with no configuration: it reads its instance id and region
from the instance metadata service (IMDSv2), finds its Auto Scaling group and every
classic ELB / target group of that group, and

  out     checks that leaving is safe, enters ASG Standby, waits until drained and deregistered
  in      leaves Standby, waits until InService in the ASG and healthy in every load balancer
  status  shows what the tool sees
  run     out, then a command, then in (only if the command succeeded)

Exit codes (a public contract):
  0 converged, or already in the wanted state     3 refused by a safety gate, nothing changed
  1 failure (AWS error, unexpected state)         4 timed out after an action was taken
  2 usage error                                   5 environment: no metadata, no ASG, no credentials
  130/143 interrupted by SIGINT/SIGTERM

Environment: AWS_EC2_METADATA_SERVICE_ENDPOINT, AWS_EC2_METADATA_DISABLED, AWS_REGION,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL[_<SERVICE>], AWS_MAX_ATTEMPTS, AWS_RETRY_MODE and the
usual credential variables, all with botocore's meaning.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

__version__ = "1.0.0"

###############################################################################
# Constants and exit codes ####################################################
###############################################################################

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TIMEOUT = 4
EXIT_ENVIRONMENT = 5
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

OUTCOMES = {
    EXIT_OK: "OK",
    EXIT_FAILED: "FAILED",
    EXIT_USAGE: "USAGE",
    EXIT_REFUSED: "REFUSED",
    EXIT_TIMEOUT: "TIMEOUT",
    EXIT_ENVIRONMENT: "ENVIRONMENT",
    EXIT_SIGINT: "INTERRUPTED",
    EXIT_SIGTERM: "INTERRUPTED",
}

STANDBY_STATES = frozenset({"EnteringStandby", "Standby"})
PENDING_STATES = frozenset({"Pending", "Pending:Wait", "Pending:Proceed"})
# Activities AWS creates for standby moves; the floor already counts those instances,
# so they must not block other instances of the same rollout.
STANDBY_ACTIVITY_PREFIXES = ("Moving EC2 instance to Standby", "Moving EC2 instance out of Standby")
TERMINAL_ACTIVITY_CODES = frozenset({"Successful", "Failed", "Cancelled"})
ACTIVE_REFRESH_STATES = frozenset({"Pending", "InProgress", "Cancelling", "RollbackInProgress", "Baking"})
# Launch suspended: AWS cannot return a Standby instance to service.
# AddToLoadBalancer suspended: the instance might come back without being registered.
BLOCKING_PROCESSES = ("Launch", "AddToLoadBalancer")

# The durable record of a MinSize this tool changed: a tag on the group, visible in the
# console, surviving reboots, shared by every instance of the group.
MIN_SIZE_TAG = "balanced:min-size"

IMDS_DEFAULT_ENDPOINT = "http://169.254.169.254/"
IMDS_TIMEOUT = 1.0
IMDS_ATTEMPTS = 2
IMDS_TOKEN_TTL = 21600

DEFAULT_TIMEOUT = 600.0
DEFAULT_POLL = 1.0
# While the load balancers are still busy, ask Auto Scaling only every this many polls (10 s at
# the default --poll): its API throttle is one bucket shared by the whole account and region.
ASG_HEARTBEAT = 10
# Far from the expected end of a drain, poll at most this slowly.
MAX_POLL = 5.0
PROGRESS_EVERY = 10.0

REGION_RE = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")
INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}$")

###############################################################################
# Errors ######################################################################
###############################################################################


class BalancedError(Exception):
    """An expected failure: its message is the operator's one-line explanation."""

    exit_code = EXIT_FAILED
    outcome: str | None = None  # the summary's word, when the exit code's own would mislead
    advice: str | None = None  # what to do next, when the generic advice would mislead


class Refused(BalancedError):
    exit_code = EXIT_REFUSED


class TimedOut(BalancedError):
    exit_code = EXIT_TIMEOUT


class NoEnvironment(BalancedError):
    exit_code = EXIT_ENVIRONMENT


class MetadataUnreachable(NoEnvironment):
    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class InstanceGone(BalancedError):
    """The instance left its group (terminated, detached) or the group was deleted."""

    advice = "the instance is gone from the group: nothing is left to finish on it"


class LbGone(BalancedError):
    """A target group or classic ELB the group lists no longer exists."""

    def __init__(self, lb: LoadBalancer, code: str) -> None:
        super().__init__(f"{lb.name} no longer exists ({code})")
        self.lb = lb


class CommandFailed(BalancedError):
    """CMD's own exit code is balanced's, so a pipeline shows the deployment's failure."""

    outcome = "COMMAND FAILED"
    advice = (
        "the instance stays out (Standby) so a broken server gets no traffic: fix it, then 'balanced.py in'"
    )

    def __init__(self, code: int, argv: list[str]) -> None:
        super().__init__(f"command exited {code}: {' '.join(argv)}")
        self.exit_code = code


# Raised from signal handlers, so BaseException like KeyboardInterrupt: botocore catches
# Exception around each HTTP attempt and would retry straight past them.
class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class AwsUnavailable(BalancedError):
    """Throttling, 5xx or no connection, still failing after botocore's retries."""


class DeadlinePassed(BaseException):
    """--timeout ran out inside an AWS call: slow answers, retries, a hung connection."""


###############################################################################
# Output ######################################################################
###############################################################################

QUIET, NORMAL, VERBOSE = 0, 1, 2


@dataclass
class Log:
    """Timestamped lines on stderr; stdout is kept for the result (--json)."""

    level: int = NORMAL
    prefix: str = "balanced"

    def line(self, msg: str, *, level: int = NORMAL) -> None:
        if level <= self.level:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            print(f"{stamp} {self.prefix}: {msg}", file=sys.stderr, flush=True)

    def info(self, msg: str) -> None:
        self.line(msg)

    def debug(self, msg: str) -> None:
        self.line(msg, level=VERBOSE)

    def warning(self, msg: str) -> None:
        self.line(f"WARNING: {msg}", level=QUIET)


def fmt_duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


###############################################################################
# Signals and the hard deadline ###############################################
###############################################################################

# The alarm fires this long after --timeout: the wait loop normally stops first, with a
# better message; the alarm covers what it cannot (retries, slow answers, hung connections).
DEADLINE_GRACE = 1.0


class Signals:
    """SIGINT/SIGTERM raise Interrupted, except inside deferred(), which finishes its few
    AWS calls first (so a MinSize change and its record are never half done); SIGALRM
    enforces --timeout whatever AWS or the network does."""

    def __init__(self) -> None:
        self.deferring = False
        self.pending: int | None = None
        self.activity: AwsActivity | None = None  # set once the AWS clients exist

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.on_interrupt)
        signal.signal(signal.SIGTERM, self.on_interrupt)
        signal.signal(signal.SIGALRM, self.on_alarm)

    def on_interrupt(self, signum: int, _frame: Any) -> None:
        if self.deferring:
            self.pending = signum
            return
        raise Interrupted(signum)

    def on_alarm(self, _signum: int, _frame: Any) -> None:
        doing = self.activity.describe() if self.activity else "the instance metadata service"
        raise DeadlinePassed(f"--timeout reached while waiting for {doing}")

    @staticmethod
    def arm_deadline(seconds: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.0) + DEADLINE_GRACE)

    @staticmethod
    def disarm_deadline() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        if self.deferring:  # nested: the outermost block decides
            yield
            return
        self.deferring, self.pending = True, None
        try:
            yield
        except Exception as e:
            if self.pending is not None:  # the operator asked to stop: that wins over the error
                raise Interrupted(self.pending) from e
            raise
        finally:
            self.deferring = False
        if self.pending is not None:
            raise Interrupted(self.pending)


###############################################################################
# Instance metadata (IMDSv2) ##################################################
###############################################################################


@dataclass(frozen=True)
class Identity:
    instance_id: str
    region: str


def imds_base_url(environ: dict[str, str]) -> str:
    url = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_DEFAULT_ENDPOINT
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise NoEnvironment(f"AWS_EC2_METADATA_SERVICE_ENDPOINT is not an http(s) URL: {url!r}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise NoEnvironment(f"AWS_EC2_METADATA_SERVICE_ENDPOINT is not an http(s) URL: {url!r}")
    try:
        parsed.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise NoEnvironment(f"AWS_EC2_METADATA_SERVICE_ENDPOINT has a bad port: {url!r}") from None
    return url if url.endswith("/") else url + "/"


class Metadata:
    """A small IMDSv2 client with botocore's fallbacks: token first, IMDSv1 if the token
    endpoint answers 403/404/405, a fresh token on 401, short timeouts, few attempts."""

    def __init__(self, base_url: str, *, timeout: float = IMDS_TIMEOUT, attempts: int = IMDS_ATTEMPTS):
        self.base_url = base_url
        self.timeout = timeout
        self.attempts = attempts
        self._token: str | None = None
        self._token_fetched = False

    def _open(self, request: urllib.request.Request) -> tuple[int, str]:
        """(status, body); throttling (429), 5xx and network errors get another attempt."""
        last: BaseException | None = None
        for _ in range(self.attempts):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    return e.code, ""
                last = e
            except (OSError, http.client.HTTPException) as e:  # refused, timed out, reset, garbled
                last = e
        if isinstance(last, urllib.error.HTTPError):
            return last.code, ""
        reason = getattr(last, "reason", None) or last
        raise MetadataUnreachable(
            f"instance metadata unreachable at {self.base_url} ({reason}): not on EC2?",
            timed_out=isinstance(reason, (TimeoutError, socket.timeout)),
        )

    def _fetch_token(self) -> str | None:
        request = urllib.request.Request(
            self.base_url + "latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)},
        )
        try:
            status, body = self._open(request)
        except MetadataUnreachable as e:
            if e.timed_out:  # e.g. a hop limit of 1 inside a container: botocore tries IMDSv1
                return None
            raise
        if status == 200:
            return body
        if status in (403, 404, 405):
            return None  # IMDSv1 only, as botocore falls back
        raise NoEnvironment(f"instance metadata token request failed with HTTP {status} at {self.base_url}")

    def get(self, path: str) -> str:
        for fresh_token in (False, True):
            if not self._token_fetched or fresh_token:
                self._token = self._fetch_token()
                self._token_fetched = True
            headers = {"X-aws-ec2-metadata-token": self._token} if self._token else {}
            status, body = self._open(urllib.request.Request(self.base_url + path, headers=headers))
            if status == 200:
                return body
            if status != 401:  # 401: the token expired; fetch a new one once
                break
        raise NoEnvironment(f"instance metadata {path} answered HTTP {status} at {self.base_url}")

    def identity(self) -> Identity:
        doc = self.get("latest/dynamic/instance-identity/document")
        try:
            parsed = json.loads(doc)
            return Identity(instance_id=parsed["instanceId"], region=parsed["region"])
        except (ValueError, KeyError, TypeError):
            raise NoEnvironment("instance metadata identity document is not valid JSON") from None


def resolve_identity(*, instance_id: str | None, region: str | None, environ: dict[str, str]) -> Identity:
    """--instance-id/--region first, then AWS_REGION/AWS_DEFAULT_REGION, then the metadata."""
    region = region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region and not REGION_RE.match(region):
        raise NoEnvironment(f"region {region!r} does not look like an AWS region (e.g. us-east-1)")
    if instance_id and region:
        return Identity(instance_id=instance_id, region=region)
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        raise NoEnvironment("AWS_EC2_METADATA_DISABLED=true: pass --instance-id and --region")
    found = Metadata(imds_base_url(environ)).identity()
    return Identity(instance_id=instance_id or found.instance_id, region=region or found.region)


###############################################################################
# AWS clients and errors ######################################################
###############################################################################


@dataclass
class AwsActivity:
    """The AWS call in flight and how its last attempt failed: what to tell the operator if
    the deadline strikes while botocore is still retrying."""

    operation: str = ""
    attempts: int = 0
    last_error: str = ""
    log: Log | None = None  # with -v, one line per attempt (operation and error code only)

    def before_call(self, model: Any, **_: Any) -> None:
        service = SERVICE_IAM_PREFIX.get(model.service_model.service_name, model.service_model.service_name)
        self.operation, self.attempts, self.last_error = f"{service}:{model.name}", 0, ""

    def after_attempt(self, attempts: int, response: Any, caught_exception: Any, **_: Any) -> None:
        self.attempts = attempts
        if caught_exception is not None:
            self.last_error = f"{type(caught_exception).__name__}: {caught_exception}"
        elif response is not None and "Error" in response[1]:
            error = response[1]["Error"]
            self.last_error = f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
        else:
            self.last_error = ""
        if self.log:
            self.log.debug(f"aws {self.operation} attempt {attempts}: {self.last_error or 'ok'}")

    def describe(self) -> str:
        if not self.operation:
            return "AWS"
        if self.last_error:
            return f"{self.operation} (still failing after {self.attempts} attempts: {self.last_error})"
        return f"{self.operation} (no answer yet)"


@dataclass
class Clients:
    """botocore clients, each made on first use: making one loads its service model (tens of
    milliseconds), and the first question always goes to Auto Scaling."""

    factory: Callable[[str], Any]
    activity: AwsActivity = field(default_factory=AwsActivity)
    made: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        from botocore.exceptions import BotoCoreError

        if service not in self.made:
            try:
                client = self.factory(service)
            except (BotoCoreError, ValueError) as e:  # e.g. a malformed AWS_ENDPOINT_URL, no such profile
                raise NoEnvironment(f"cannot set up the AWS {service} client: {e}") from None
            client.meta.events.register("before-call.*.*", self.activity.before_call)
            client.meta.events.register("needs-retry.*.*", self.activity.after_attempt)
            self.made[service] = client
        return self.made[service]

    @property
    def autoscaling(self) -> Any:
        return self.client("autoscaling")

    @property
    def elbv2(self) -> Any:
        return self.client("elbv2")

    @property
    def elb(self) -> Any:
        return self.client("elb")


RETRY_MODES = ("standard", "adaptive", "legacy")
DEFAULT_MAX_ATTEMPTS = 10


def retry_config(environ: dict[str, str]) -> dict[str, Any]:
    """botocore retries throttling, 5xx and dropped connections itself. "standard" mode: capped,
    jittered exponential backoff and a retry quota, the same in every AWS SDK. More attempts
    than its default 3, because a fleet rolling at once shares one Auto Scaling throttle; the
    hard deadline still bounds the total. AWS_RETRY_MODE/AWS_MAX_ATTEMPTS override, as usual."""
    mode = environ.get("AWS_RETRY_MODE") or "standard"
    if mode not in RETRY_MODES:
        raise NoEnvironment(f"AWS_RETRY_MODE={mode!r} is not one of {', '.join(RETRY_MODES)}")
    attempts = environ.get("AWS_MAX_ATTEMPTS") or str(DEFAULT_MAX_ATTEMPTS)
    if not attempts.isdigit() or int(attempts) < 1:
        raise NoEnvironment(f"AWS_MAX_ATTEMPTS={attempts!r} is not a whole number of attempts (1 or more)")
    return {"mode": mode, "total_max_attempts": int(attempts)}


def make_clients(region: str, environ: dict[str, str]) -> Clients:
    # botocore itself, not boto3's wrapper: the same clients, endpoints and credential chain,
    # and a faster start (this runs on every deployment of every instance).
    import botocore.session
    from botocore.config import Config

    config = Config(
        retries=retry_config(environ),
        connect_timeout=5,
        read_timeout=20,
        user_agent_extra=f"balanced/{__version__}",
    )
    session = botocore.session.get_session()
    return Clients(factory=lambda service: session.create_client(service, region_name=region, config=config))


CREDENTIAL_ERRORS = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "AuthFailure",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "RequestExpired",
    }
)
THROTTLING_ERRORS = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
SERVICE_IAM_PREFIX = {
    "autoscaling": "autoscaling",
    "elbv2": "elasticloadbalancing",
    "elb": "elasticloadbalancing",
}


def error_code(exc: BaseException | None) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def translate_aws_error(exc: Exception, doing: str, service: str = "") -> BalancedError:
    """Map a botocore exception to our error family, keeping botocore's own text."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return NoEnvironment(
            f"no AWS credentials ({exc}): attach an instance profile or set AWS_* credentials"
        )
    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return AwsUnavailable(f"failed to {doing}: {exc}")
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in THROTTLING_ERRORS or status >= 500:
            return AwsUnavailable(f"failed to {doing}: {exc}")
        if code in CREDENTIAL_ERRORS:
            return NoEnvironment(f"AWS rejected the credentials while trying to {doing}: {exc}")
        if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation"):
            op = exc.operation_name
            prefix = SERVICE_IAM_PREFIX.get(service, "")
            action = f"{prefix}:{op}" if prefix else op
            return BalancedError(f"{doing}: access denied: the instance role needs {action} ({exc})")
    return BalancedError(f"failed to {doing}: {exc}")


@contextlib.contextmanager
def translated(doing: str, service: str) -> Iterator[None]:
    """botocore's exceptions as ours (see translate_aws_error), keeping botocore's own text."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as e:
        raise translate_aws_error(e, doing, service) from e


def aws_call(client: Any, operation: str, doing: str, **params: Any) -> dict[str, Any]:
    """One API call; botocore already retried throttling and 5xx."""
    with translated(doing, client.meta.service_model.service_name):
        result: dict[str, Any] = getattr(client, operation)(**params)
        return result


def aws_pages(client: Any, operation: str, doing: str, **params: Any) -> Iterator[dict[str, Any]]:
    with translated(doing, client.meta.service_model.service_name):
        yield from client.get_paginator(operation).paginate(**params)


###############################################################################
# AWS view ####################################################################
###############################################################################


@dataclass(frozen=True)
class Member:
    instance_id: str
    lifecycle: str
    health: str  # "Healthy"/"Unhealthy"; AWS spells it in two casings


@dataclass(frozen=True)
class LoadBalancer:
    kind: str  # "tg" (ALB/NLB target group) or "elb" (classic)
    id: str  # target group ARN or classic ELB name

    @property
    def name(self) -> str:
        if self.kind == "tg":
            return "tg/" + self.id.split(":targetgroup/")[-1].split("/")[0]
        return "elb/" + self.id


@dataclass(frozen=True)
class Group:
    name: str
    min_size: int
    max_size: int
    desired: int
    members: tuple[Member, ...]
    suspended: frozenset[str]
    load_balancers: tuple[LoadBalancer, ...]
    unsupported_sources: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    status: str = ""

    @property
    def out_count(self) -> int:
        return sum(1 for m in self.members if m.lifecycle in STANDBY_STATES)

    @property
    def full_capacity(self) -> int:
        """Desired capacity as it was before anyone entered Standby with decrement."""
        return self.desired + self.out_count

    def member(self, instance_id: str) -> Member | None:
        return next((m for m in self.members if m.instance_id == instance_id), None)


@dataclass(frozen=True)
class LbState:
    """One instance as one load balancer sees it."""

    state: str  # ELBv2 TargetHealth.State, or classic InService/OutOfService/Unknown
    reason: str = ""

    def describe(self) -> str:
        return f"{self.state} ({self.reason})" if self.reason else self.state


def describe_asg_instance(clients: Clients, instance_id: str) -> dict[str, Any] | None:
    """The instance's ASG record; None when it is in no group (AWS ignores unknown ids)."""
    result = aws_call(
        clients.autoscaling,
        "describe_auto_scaling_instances",
        "describe this instance in Auto Scaling",
        InstanceIds=[instance_id],
    )
    found = result.get("AutoScalingInstances", [])
    return found[0] if found else None


def describe_group(clients: Clients, name: str) -> Group:
    groups = [
        g
        for page in aws_pages(
            clients.autoscaling,
            "describe_auto_scaling_groups",
            f"describe Auto Scaling group {name}",
            AutoScalingGroupNames=[name],
        )
        for g in page.get("AutoScalingGroups", [])
    ]
    if not groups:
        raise NoEnvironment(f"Auto Scaling group {name} no longer exists")
    return group_from_api(groups[0])


def group_from_api(raw: dict[str, Any]) -> Group:
    lbs: list[LoadBalancer] = [LoadBalancer("elb", n) for n in raw.get("LoadBalancerNames", [])]
    lbs += [LoadBalancer("tg", a) for a in raw.get("TargetGroupARNs", [])]
    unsupported: list[str] = []
    for source in raw.get("TrafficSources", []):
        kind = {"elb": "elb", "elbv2": "tg"}.get(source.get("Type", ""))
        if kind is None:
            unsupported.append(f"{source.get('Type', '?')}:{source.get('Identifier', '?')}")
        elif LoadBalancer(kind, source["Identifier"]) not in lbs:
            lbs.append(LoadBalancer(kind, source["Identifier"]))
    return Group(
        name=raw["AutoScalingGroupName"],
        min_size=int(raw["MinSize"]),
        max_size=int(raw["MaxSize"]),
        desired=int(raw["DesiredCapacity"]),
        members=tuple(
            Member(i["InstanceId"], i.get("LifecycleState", "?"), i.get("HealthStatus", "?"))
            for i in raw.get("Instances", [])
        ),
        suspended=frozenset(p["ProcessName"] for p in raw.get("SuspendedProcesses", [])),
        load_balancers=tuple(lbs),
        unsupported_sources=tuple(unsupported),
        tags={t["Key"]: t.get("Value", "") for t in raw.get("Tags", [])},
        status=raw.get("Status", "") or "",
    )


def unfinished_activities(clients: Clients, group: str) -> Iterator[dict[str, Any]]:
    """The group's scaling activities that have not finished. AWS lists unfinished activities
    first, so paging stops at the first finished one."""
    for page in aws_pages(
        clients.autoscaling,
        "describe_scaling_activities",
        f"describe scaling activities of {group}",
        AutoScalingGroupName=group,
        PaginationConfig={"PageSize": 20},
    ):
        for activity in page.get("Activities", []):
            if activity.get("StatusCode") in TERMINAL_ACTIVITY_CODES:
                return
            yield activity


def in_progress_activities(clients: Clients, group: str) -> list[str]:
    """Unfinished activities other than standby moves, which the floor already counts."""
    return [
        f"{a.get('Description', '?')} ({a.get('StatusCode')})"
        for a in unfinished_activities(clients, group)
        if not a.get("Description", "").startswith(STANDBY_ACTIVITY_PREFIXES)
    ]


def active_instance_refresh(clients: Clients, group: str) -> str | None:
    """The status of an unfinished instance refresh; only the newest can be active."""
    result = aws_call(
        clients.autoscaling,
        "describe_instance_refreshes",
        f"describe instance refreshes of {group}",
        AutoScalingGroupName=group,
        MaxRecords=1,
    )
    for refresh in result.get("InstanceRefreshes", []):
        if refresh.get("Status") in ACTIVE_REFRESH_STATES:
            return f"{refresh.get('InstanceRefreshId', '?')} ({refresh['Status']})"
    return None


def lb_states(clients: Clients, lb: LoadBalancer, instance_id: str | None = None) -> dict[str, LbState]:
    """Every registered instance's state in one LB, or one instance's (even if unregistered)."""
    from botocore.exceptions import ClientError

    with translated(f"read health of {lb.name}", "elbv2" if lb.kind == "tg" else "elb"):
        try:
            if lb.kind == "tg":
                return target_group_states(clients, lb, instance_id)
            return classic_elb_states(clients, lb, instance_id)
        except ClientError as e:
            code = error_code(e)
            if instance_id and code in ("InvalidTarget", "InvalidInstance"):
                # What AWS's own deregistered waiters accept as "deregistered".
                return {instance_id: LbState("unused", code)}
            if code in ("TargetGroupNotFound", "LoadBalancerNotFound"):
                raise LbGone(lb, code) from e
            raise


def target_group_states(clients: Clients, lb: LoadBalancer, instance_id: str | None) -> dict[str, LbState]:
    params: dict[str, Any] = {"TargetGroupArn": lb.id}
    if instance_id:
        params["Targets"] = [{"Id": instance_id}]
    result = clients.elbv2.describe_target_health(**params)
    states: dict[str, LbState] = {}
    for d in result.get("TargetHealthDescriptions", []):
        state = LbState(d["TargetHealth"]["State"], d["TargetHealth"].get("Reason", ""))
        states[d["Target"]["Id"]] = worse(states.get(d["Target"]["Id"]), state)
    return states


def worse(a: LbState | None, b: LbState) -> LbState:
    """One instance registered on several ports: unused < healthy < anything in between, so
    it counts as serving or as deregistered only when every port agrees."""
    rank = {"unused": 0, "healthy": 1}
    return b if a is None or rank.get(b.state, 2) >= rank.get(a.state, 2) else a


def classic_elb_states(clients: Clients, lb: LoadBalancer, instance_id: str | None) -> dict[str, LbState]:
    params: dict[str, Any] = {"LoadBalancerName": lb.id}
    if instance_id:
        params["Instances"] = [{"InstanceId": instance_id}]
    result = clients.elb.describe_instance_health(**params)
    return {d["InstanceId"]: classic_state(d) for d in result.get("InstanceStates", [])}


def classic_state(description: dict[str, Any]) -> LbState:
    """Classic ELB reports a draining instance as InService; tell it apart by Description."""
    state = description.get("State", "Unknown")
    text = description.get("Description", "")
    if state == "InService" and "deregistration currently in progress" in text:
        return LbState("draining", "connection draining")
    if state == "OutOfService" and "not currently registered" in text:
        return LbState("OutOfService", "not registered")
    return LbState(state, "" if state == "InService" else text.rstrip("."))


def is_serving(state: LbState | None) -> bool:
    return state is not None and state.state in ("healthy", "InService")


def is_deregistered(state: LbState | None) -> bool:
    """The meaning of AWS's own waiters: elbv2 target_deregistered (unused, or InvalidTarget)
    and elb instance_deregistered (OutOfService, or InvalidInstance)."""
    return state is None or state.state in ("unused", "OutOfService")


def drain_seconds(clients: Clients, lb: LoadBalancer) -> float:
    """How long AWS may keep draining: deregistration delay or connection-draining timeout."""
    if lb.kind == "tg":
        result = aws_call(
            clients.elbv2,
            "describe_target_group_attributes",
            f"read attributes of {lb.name}",
            TargetGroupArn=lb.id,
        )
        attrs = {a["Key"]: a["Value"] for a in result.get("Attributes", [])}
        return float(attrs.get("deregistration_delay.timeout_seconds", 300))
    result = aws_call(
        clients.elb,
        "describe_load_balancer_attributes",
        f"read attributes of {lb.name}",
        LoadBalancerName=lb.id,
    )
    draining = result.get("LoadBalancerAttributes", {}).get("ConnectionDraining", {})
    return float(draining.get("Timeout", 300)) if draining.get("Enabled") else 0.0


@dataclass(frozen=True)
class Snapshot:
    """Everything the gates look at, read once."""

    group: Group
    me: Member
    health: dict[LoadBalancer, dict[str, LbState]]
    activities: tuple[str, ...] = ()
    refresh: str | None = None


def find_group_name(clients: Clients, instance_id: str) -> str:
    record = describe_asg_instance(clients, instance_id)
    if record is None:
        raise NoEnvironment(f"{instance_id} is not in any Auto Scaling group")
    return str(record["AutoScalingGroupName"])


def take_snapshot(clients: Clients, instance_id: str, group_name: str, *, gates: bool) -> Snapshot:
    group = describe_group(clients, group_name)
    me = group.member(instance_id)
    if me is None:
        raise NoEnvironment(f"{instance_id} is no longer in Auto Scaling group {group_name}")
    health = {}
    for lb in group.load_balancers:
        try:
            health[lb] = lb_states(clients, lb)
        except LbGone as e:
            raise BalancedError(f"{e}, but {group_name} still lists it: detach it from the group") from e
    if not gates:
        return Snapshot(group=group, me=me, health=health)
    return Snapshot(
        group=group,
        me=me,
        health=health,
        activities=tuple(in_progress_activities(clients, group_name)),
        refresh=active_instance_refresh(clients, group_name),
    )


###############################################################################
# Gates #######################################################################
###############################################################################


def serving_instances(group: Group, health: dict[LoadBalancer, dict[str, LbState]]) -> list[str]:
    """InService and Healthy in the ASG, and healthy in every load balancer."""
    return [
        m.instance_id
        for m in group.members
        if m.lifecycle == "InService"
        and m.health.lower() == "healthy"
        and all(is_serving(states.get(m.instance_id)) for states in health.values())
    ]


def floor_for(full_capacity: int, *, min_healthy: int, min_healthy_percent: float) -> int:
    """Serving instances that must remain: at least N, and at least P% of full capacity,
    rounded up (75% of 10 is 8: a floor never rounds in the unsafe direction)."""
    by_percent = math.ceil(full_capacity * min_healthy_percent / 100 - 1e-9)
    return max(min_healthy, by_percent)


@dataclass(frozen=True)
class MinSizeRecord:
    """What the tag says: the operator's MinSize, and the one this rollout holds."""

    original: int
    rollout: int

    def to_tag(self) -> str:
        return f"original={self.original} rollout={self.rollout}"


def parse_min_size_tag(value: str | None) -> MinSizeRecord | None:
    if not value:
        return None
    fields = dict(part.split("=", 1) for part in value.split() if "=" in part)
    try:
        return MinSizeRecord(original=int(fields["original"]), rollout=int(fields["rollout"]))
    except (KeyError, ValueError):
        raise BalancedError(
            f"tag {MIN_SIZE_TAG}={value!r} on the group is not 'original=N rollout=M': "
            "fix or delete it by hand"
        ) from None


def out_refusals(snap: Snapshot, *, floor: int) -> list[str]:
    """Why taking this instance out now would be unsafe; empty when it is safe."""
    return lasting_refusals(snap, floor=floor) + passing_refusals(snap, floor=floor)


def lasting_refusals(snap: Snapshot, *, floor: int) -> list[str]:
    """Refusals that waiting cannot cure: a human must act, so --wait does not wait for them."""
    group, reasons = snap.group, []
    if group.status:
        reasons.append(f"group {group.name} is being changed ({group.status})")
    blocked = [p for p in BLOCKING_PROCESSES if p in group.suspended]
    if blocked:
        reasons.append(
            f"suspended process {', '.join(blocked)} would keep this instance from coming back "
            f"(aws autoscaling resume-processes --auto-scaling-group-name {group.name} "
            f"--scaling-processes {' '.join(blocked)})"
        )
    if floor > group.full_capacity - 1:
        reasons.append(
            f"the floor of {floor} serving instances can never be met while this one is out: "
            f"{group.name} has {group.full_capacity} in all; lower --min-healthy/--min-healthy-percent"
        )
    return reasons + min_size_conflicts(group, floor=floor)


def passing_refusals(snap: Snapshot, *, floor: int) -> list[str]:
    """Refusals that pass by themselves: activities end, instances come back."""
    group, reasons = snap.group, []
    if snap.me.lifecycle != "InService":
        reasons.append(f"this instance is {snap.me.lifecycle}, not InService")
    if snap.activities:
        reasons.append(f"scaling activity in progress: {snap.activities[0]}")
    if snap.refresh:
        reasons.append(f"instance refresh in progress: {snap.refresh}")
    others = [i for i in serving_instances(group, snap.health) if i != snap.me.instance_id]
    if len(others) < floor <= group.full_capacity - 1:
        reasons.append(
            f"only {len(others)} other instance(s) serving in {group.name}, need {floor} "
            f"({len(others)} of {group.full_capacity} serving, floor {floor})"
        )
    return reasons


def min_size_conflicts(group: Group, *, floor: int) -> list[str]:
    try:
        record = parse_min_size_tag(group.tags.get(MIN_SIZE_TAG))
    except BalancedError as e:
        return [str(e)]
    if record is None:
        return []
    if group.min_size not in (record.rollout, record.original):
        return [
            (
                f"MinSize is {group.min_size} but tag {MIN_SIZE_TAG} says {record.to_tag()}: "
                "someone changed MinSize during a rollout; settle it and delete the tag"
            )
        ]
    if record.rollout != floor and group.out_count:
        return [
            (
                f"another rollout holds MinSize at {record.rollout} with a different floor "
                f"(this one needs {floor}): use the same --min-healthy/--min-healthy-percent"
            )
        ]
    return []


def must_hold_min_size(group: Group, *, floor: int) -> bool:
    """MinSize is AWS's atomic guard: EnterStandby with decrement fails below it. Held at the
    floor it lets at most full - floor instances out. Hold it when the operator's value would
    block this instance or would let more than that out, and re-assert it whenever a rollout
    is recorded: our read of MinSize may be stale by now."""
    return MIN_SIZE_TAG in group.tags or group.min_size > group.desired - 1 or group.min_size < floor


def in_refusals(group: Group, me: Member) -> list[str]:
    reasons = []
    if "Launch" in group.suspended:
        reasons.append(
            f"suspended process Launch keeps AWS from returning Standby instances to service "
            f"(aws autoscaling resume-processes --auto-scaling-group-name {group.name} "
            "--scaling-processes Launch)"
        )
    if me.lifecycle == "Standby" and group.desired + 1 > group.max_size:
        reasons.append(
            f"leaving Standby raises desired capacity to {group.desired + 1}, above MaxSize {group.max_size}"
        )
    return reasons


###############################################################################
# Run context #################################################################
###############################################################################


@dataclass
class Context:
    """Plain values the commands work with; built once in main()."""

    clients: Clients
    instance_id: str
    log: Log
    waiter: Waiter
    signals: Signals = field(default_factory=Signals)
    dry_run: bool = False
    actions: list[str] = field(default_factory=list)
    group_name: str = ""
    lifecycle: str = ""
    held: MinSizeRecord | None = None  # what this run wrote to the tag
    attempting: str = ""  # a change requested from AWS whose answer has not come back yet
    yielded: bool = False  # gave its slot back after a race: out and in again
    phase: str = ""  # "out" or "in": which command finishes the job after a failure

    def set_deadline(self, seconds: float) -> None:
        self.waiter.deadline = self.waiter.clock() + seconds
        self.signals.arm_deadline(seconds)

    def did(self, action: str) -> None:
        self.actions.append(action)
        self.log.info(action)


###############################################################################
# Waiting #####################################################################
###############################################################################

DONE, WAIT, FAILED = "done", "wait", "failed"


@dataclass(frozen=True)
class Verdict:
    status: str  # DONE, WAIT or FAILED
    explanation: str
    gone: bool = False  # FAILED because the instance left its group


def next_poll_delay(*, elapsed: float, expected: float, poll: float) -> float:
    """Poll fast near and after the expected end, slower before it (at most MAX_POLL):
    a drain that ends early is still seen within MAX_POLL seconds."""
    remaining = expected - elapsed
    if remaining <= 2 * poll:
        return poll
    return min(max(poll, remaining / 4), max(poll, MAX_POLL))


@dataclass
class Waiter:
    """One loop for a composite condition under one deadline, probing before the first sleep."""

    log: Log
    deadline: float
    poll: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def wait(
        self, probe: Callable[[], Verdict], *, what: str, expected: float = 0.0, settle: bool = False
    ) -> Verdict:
        """settle: the caller has just acted (and read the load balancers, or knows their answer),
        so the first probe comes one poll interval later instead of at once."""
        start = self.clock()
        if settle:
            self.sleep(min(next_poll_delay(elapsed=0.0, expected=expected, poll=self.poll), self.time_left()))
        last_text, last_logged = "", -math.inf
        seen = "nothing yet"
        while True:
            try:
                verdict = probe()
                seen = verdict.explanation
            except AwsUnavailable as e:  # one lost poll is no reason to abandon a deployment
                verdict = Verdict(WAIT, f"{seen}; AWS unavailable: {e}")
            if verdict.status != WAIT:
                return verdict
            now = self.clock()
            left = self.deadline - now
            if left <= 0:
                raise TimedOut(f"timed out waiting for {what}; last seen: {verdict.explanation}")
            if verdict.explanation != last_text or now - last_logged >= PROGRESS_EVERY:
                self.log.info(
                    f"waiting: {verdict.explanation}, {fmt_duration(now - start)} elapsed, "
                    f"{fmt_duration(left)} left"
                )
                last_text, last_logged = verdict.explanation, now
            delay = next_poll_delay(elapsed=now - start, expected=expected, poll=self.poll)
            # Jitter only upwards: never more than one call per poll interval to a load balancer.
            self.sleep(min(delay * random.uniform(1.0, 1.2), self.time_left()))

    def time_left(self) -> float:
        return max(self.deadline - self.clock(), 0.01)


def lifecycle_of(clients: Clients, instance_id: str) -> str | None:
    record = describe_asg_instance(clients, instance_id)
    return None if record is None else str(record.get("LifecycleState"))


def own_lb_states(
    clients: Clients, lbs: Sequence[LoadBalancer], instance_id: str
) -> dict[LoadBalancer, LbState]:
    return {lb: lb_states(clients, lb, instance_id).get(instance_id, LbState("unused")) for lb in lbs}


def pending_lbs(states: dict[LoadBalancer, LbState], accept: Callable[[LbState], bool]) -> str:
    return "; ".join(f"{lb.name} {s.describe()}" for lb, s in states.items() if not accept(s))


# Target reasons that say the instance itself is gone: ask Auto Scaling now, not at the heartbeat.
GONE_REASONS = frozenset({"Target.InvalidState", "InvalidTarget", "InvalidInstance"})


# What a load balancer says of an instance not registered there at all. While waiting for
# `in`, that may be a load balancer detached from the group: worth re-reading the group.
NOT_REGISTERED_REASONS = frozenset({"Target.NotRegistered", "not registered"})


class AsgProbe:
    """Asks Auto Scaling only when the load balancers say done or the instance looks gone, and
    as a heartbeat every ASG_HEARTBEAT polls: this instance's record (an answer whose size does
    not grow with the group) notices a terminated or detached instance. The whole group is
    re-read on the heartbeat only when a load balancer says the instance is not registered
    there: a load balancer detached from the group, which would otherwise be waited out."""

    def __init__(self, ctx: Context, group: Group):
        self.ctx = ctx
        self.lbs = list(group.load_balancers)
        self.last_at = ctx.waiter.clock()  # the caller just read the group
        self.lifecycle: str | None = "?"
        self.reads = 0

    def read(self, *, lbs_done: bool, looks_gone: bool, looks_detached: bool) -> str | None:
        heartbeat = self.ctx.waiter.clock() - self.last_at >= ASG_HEARTBEAT * self.ctx.waiter.poll
        if heartbeat and looks_detached:
            self.refresh_group()
        elif heartbeat or lbs_done or looks_gone:
            self.lifecycle = lifecycle_of(self.ctx.clients, self.ctx.instance_id)
            self.last_at = self.ctx.waiter.clock()
            self.reads += 1
        if self.lifecycle not in (None, "?"):
            self.ctx.lifecycle = str(self.lifecycle)  # what a failure summary reports
        return self.lifecycle

    def refresh_group(self) -> None:
        try:
            group = describe_group(self.ctx.clients, self.ctx.group_name)
        except NoEnvironment:  # the group itself was deleted
            self.lifecycle = None
            return
        me = group.member(self.ctx.instance_id)
        self.lifecycle = me.lifecycle if me else None
        self.reads += 1
        for lb in [lb for lb in self.lbs if lb not in group.load_balancers]:
            self.ctx.log.warning(f"{lb.name} was detached from {group.name}; no longer waiting for it")
            self.lbs.remove(lb)
        self.last_at = self.ctx.waiter.clock()


def left_the_group(instance_id: str) -> Verdict:
    return Verdict(FAILED, f"{instance_id} left its Auto Scaling group (terminated or detached)", gone=True)


def out_verdict(lifecycle: str | None, states: dict[LoadBalancer, LbState], instance_id: str) -> Verdict:
    """Out means lifecycle Standby and deregistered from every LB."""
    if lifecycle is None:
        return left_the_group(instance_id)
    if lifecycle not in STANDBY_STATES and lifecycle != "?":
        return Verdict(FAILED, f"{instance_id} is {lifecycle} instead of going to Standby")
    busy = pending_lbs(states, is_deregistered)
    if busy:
        return Verdict(WAIT, f"{busy} (deregistration delay)")
    if lifecycle != "Standby":
        return Verdict(WAIT, f"lifecycle {lifecycle}, deregistered everywhere")
    return Verdict(DONE, "Standby, deregistered from " + lb_count(len(states)))


def in_verdict(lifecycle: str | None, states: dict[LoadBalancer, LbState], instance_id: str) -> Verdict:
    """In means lifecycle InService and healthy in every LB."""
    if lifecycle is None:
        return left_the_group(instance_id)
    if lifecycle.startswith(("Terminating", "Terminated", "Detach", "Warmed")):
        return Verdict(FAILED, f"{instance_id} is {lifecycle}; it will not come back")
    if lifecycle in STANDBY_STATES:
        return Verdict(FAILED, f"{instance_id} is {lifecycle} again: someone put it back out")
    busy = pending_lbs(states, is_serving)
    if busy:
        return Verdict(WAIT, f"{busy} (health checks)")
    if lifecycle != "InService":
        return Verdict(WAIT, f"lifecycle {lifecycle}, healthy everywhere")
    return Verdict(DONE, "InService, healthy in " + lb_count(len(states)))


def lb_count(n: int) -> str:
    return "1 load balancer" if n == 1 else f"{n} load balancers"


@dataclass(frozen=True)
class Goal:
    """What a wait is for: the verdict on each probe, and what "done" means in one LB."""

    what: str
    verdict: Callable[[str | None, dict[LoadBalancer, LbState], str], Verdict]
    accept: Callable[[LbState], bool]
    leaving: bool  # out: a vanished LB is as deregistered as it gets; in: look for detached LBs


OUT = Goal("Standby and deregistration", out_verdict, is_deregistered, leaving=True)
IN = Goal("InService and healthy", in_verdict, is_serving, leaving=False)


def wait_until(
    goal: Goal, *, ctx: Context, group: Group, expected: float = 0.0, settle: bool = False
) -> Verdict:
    asg = AsgProbe(ctx, group)

    def probe() -> Verdict:
        try:
            states = own_lb_states(ctx.clients, asg.lbs, ctx.instance_id)
        except LbGone as e:
            if not goal.leaving:
                return Verdict(FAILED, f"{e}: the instance can never become healthy there")
            ctx.log.warning(f"{e}; nothing to deregister from there")
            asg.lbs.remove(e.lb)
            return Verdict(WAIT, str(e))
        lifecycle = asg.read(
            lbs_done=all(goal.accept(s) for s in states.values()),
            looks_gone=any(s.reason in GONE_REASONS for s in states.values()),
            looks_detached=not goal.leaving
            and any(s.reason in NOT_REGISTERED_REASONS for s in states.values()),
        )
        verdict = goal.verdict(lifecycle, states, ctx.instance_id)
        if verdict.status == FAILED and not verdict.gone and asg.reads < 2:
            # The first read right after our own EnterStandby/ExitStandby may not show it
            # yet: a lifecycle that contradicts it is believed on the second read.
            return Verdict(WAIT, f"{verdict.explanation} (confirming)")
        return verdict

    verdict = ctx.waiter.wait(probe, what=goal.what, expected=expected, settle=settle)
    if verdict.gone:
        ctx.lifecycle = "gone"
        raise InstanceGone(verdict.explanation)
    if verdict.status == FAILED:
        raise BalancedError(verdict.explanation)
    return verdict


###############################################################################
# Actions #####################################################################
###############################################################################


def is_min_size_error(exc: BaseException) -> bool:
    cause = exc.__cause__
    return error_code(cause) == "ValidationError" and "update the AutoScalingGroup sizes" in str(cause)


def hold_min_size(ctx: Context, group: Group, *, floor: int) -> None:
    """Record the operator's MinSize in the tag first, then set MinSize to the floor. Both
    writes are absolute values every instance of the rollout agrees on, so they are
    made unconditionally: skipping them on a stale read is how a guard gets lost."""
    record = parse_min_size_tag(group.tags.get(MIN_SIZE_TAG))
    ctx.held = MinSizeRecord(original=record.original if record else group.min_size, rollout=floor)
    write_min_size_tag(ctx, group.name, ctx.held)
    try:
        aws_call(
            ctx.clients.autoscaling,
            "update_auto_scaling_group",
            f"set MinSize of {group.name} to {floor}",
            AutoScalingGroupName=group.name,
            MinSize=floor,
        )
    except BalancedError as e:
        ctx.held = None
        take_back_record(ctx, group.name, error=e)
        raise
    ctx.did(
        f"MinSize of {group.name} {group.min_size} -> {floor} "
        f"(operator's {ctx.held.original} kept in tag {MIN_SIZE_TAG})"
    )


def take_back_record(ctx: Context, group: str, *, error: BalancedError) -> None:
    """After a failed MinSize change: drop the tag only if nothing needs it. The change may
    have happened (a lost answer), or another out may hold MinSize under the same record."""
    try:
        now = describe_group(ctx.clients, group)
        record = parse_min_size_tag(now.tags.get(MIN_SIZE_TAG))
        if record and now.min_size == record.original and not now.out_count:
            delete_min_size_tag(ctx, group)
        elif record:
            ctx.log.warning(
                f"MinSize change failed ({error}); tag {MIN_SIZE_TAG} kept: MinSize is {now.min_size}"
            )
    except BalancedError as e:
        ctx.log.warning(f"could not check tag {MIN_SIZE_TAG} after a failed MinSize change: {e}")


def write_min_size_tag(ctx: Context, group: str, record: MinSizeRecord) -> None:
    aws_call(
        ctx.clients.autoscaling,
        "create_or_update_tags",
        f"tag {group} with {MIN_SIZE_TAG}",
        Tags=[
            {
                "ResourceId": group,
                "ResourceType": "auto-scaling-group",
                "Key": MIN_SIZE_TAG,
                "Value": record.to_tag(),
                "PropagateAtLaunch": False,
            }
        ],
    )


def release_min_size(ctx: Context, group: Group, *, back_in: bool) -> None:
    """Give the operator's MinSize back once no instance of the group is out any more.
    Only after ExitStandby: a MinSize above desired capacity makes AWS launch instances."""
    record = parse_min_size_tag(group.tags.get(MIN_SIZE_TAG))
    if record is None:
        return
    # Back in (after ExitStandby): our own record may still read Standby, so count the others.
    others_out = others_out_of(group, ctx.instance_id) if back_in else group.out_count
    if others_out:
        ctx.log.warning(
            f"MinSize of {group.name} stays at {group.min_size} while {others_out} other instance(s) "
            f"are out; the last one back restores {record.original}"
        )
        return
    if group.min_size not in (record.rollout, record.original):
        ctx.log.warning(
            f"MinSize of {group.name} is {group.min_size}, set by someone else during the rollout "
            f"(not {record.rollout}); leaving it, not restoring {record.original}"
        )
    elif group.min_size != record.original:
        aws_call(
            ctx.clients.autoscaling,
            "update_auto_scaling_group",
            f"restore MinSize of {group.name} to {record.original}",
            AutoScalingGroupName=group.name,
            MinSize=record.original,
        )
        ctx.did(f"MinSize of {group.name} restored {group.min_size} -> {record.original}")
        # Another out may have held MinSize again since our read: then the record is its.
        after = describe_group(ctx.clients, group.name)
        still_out = others_out_of(after, ctx.instance_id) if back_in else after.out_count
        if still_out or after.min_size != record.original:
            ctx.log.info(f"another out holds MinSize of {group.name} again; its record stays")
            return
    delete_min_size_tag(ctx, group.name)


def others_out_of(group: Group, instance_id: str) -> int:
    """Instances of the group out in Standby, this one excluded: when we call this, it is not
    out (any more), even if a read right after ExitStandby still says so."""
    return sum(1 for m in group.members if m.lifecycle in STANDBY_STATES and m.instance_id != instance_id)


def delete_min_size_tag(ctx: Context, group: str) -> None:
    aws_call(
        ctx.clients.autoscaling,
        "delete_tags",
        f"delete tag {MIN_SIZE_TAG} from {group}",
        Tags=[{"ResourceId": group, "ResourceType": "auto-scaling-group", "Key": MIN_SIZE_TAG}],
    )
    ctx.log.info(f"removed tag {MIN_SIZE_TAG} from {group}")


def keep_record_alive(ctx: Context, group: Group) -> None:
    """A concurrent 'last one back' may have deleted the tag just after we held MinSize."""
    if ctx.held and MIN_SIZE_TAG not in group.tags and group.min_size == ctx.held.rollout:
        write_min_size_tag(ctx, group.name, ctx.held)
        ctx.log.info(f"re-wrote tag {MIN_SIZE_TAG} that a concurrent in removed")


def enter_standby(ctx: Context, group: str) -> None:
    ctx.attempting = "EnterStandby"  # if the deadline strikes mid-call, AWS may have applied it
    with ctx.signals.deferred():
        request_transition(
            ctx,
            "enter_standby",
            "enter Standby",
            applied=STANDBY_STATES,
            AutoScalingGroupName=group,
            InstanceIds=[ctx.instance_id],
            ShouldDecrementDesiredCapacity=True,
        )
    ctx.attempting, ctx.lifecycle = "", "EnteringStandby"
    ctx.did(f"EnterStandby {ctx.instance_id} in {group} (desired capacity -1, no replacement)")


def exit_standby(ctx: Context, group: str) -> None:
    ctx.attempting = "ExitStandby"
    with ctx.signals.deferred():
        request_transition(
            ctx,
            "exit_standby",
            "exit Standby",
            applied=PENDING_STATES | {"InService"},
            AutoScalingGroupName=group,
            InstanceIds=[ctx.instance_id],
        )
    ctx.attempting, ctx.lifecycle = "", "Pending"
    ctx.did(f"ExitStandby {ctx.instance_id} in {group} (desired capacity +1)")


def request_transition(
    ctx: Context, operation: str, doing: str, *, applied: frozenset[str], **params: Any
) -> None:
    """A standby move. When its answer is an error, ask where the instance is: botocore may have
    retried after a lost answer, and AWS then rejects the retry of a move it already made."""
    try:
        aws_call(ctx.clients.autoscaling, operation, doing, **params)
    except BalancedError as e:
        ctx.log.warning(f"{e}; checking where the instance is")
        lifecycle = lifecycle_of(ctx.clients, ctx.instance_id)  # may fail too: attempting stays
        if lifecycle not in applied:
            ctx.attempting = ""  # AWS answered, and the instance has not moved
            raise
        ctx.log.warning(f"{doing}: an earlier attempt went through (its answer was lost); now {lifecycle}")


###############################################################################
# Commands ####################################################################
###############################################################################


@dataclass
class Result:
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FloorRule:
    """--min-healthy and --min-healthy-percent: the floor of a group, as a number of instances."""

    min_healthy: int
    min_healthy_percent: float

    def floor(self, group: Group) -> int:
        return floor_for(
            group.full_capacity, min_healthy=self.min_healthy, min_healthy_percent=self.min_healthy_percent
        )


def log_traffic_sources(ctx: Context, group: Group) -> None:
    for lb in group.load_balancers:
        ctx.log.debug(f"{lb.name} is {lb.id}")
    for source in group.unsupported_sources:
        ctx.log.warning(f"traffic source {source} cannot be checked by this tool; it is not waited for")


def expected_drain(ctx: Context, group: Group) -> float:
    return max((drain_seconds(ctx.clients, lb) for lb in group.load_balancers), default=0.0)


def drain_budget(drain: float) -> float:
    """Time to allow for a drain: AWS moves the instance to Standby a little after the drain."""
    return drain * 1.1 + 1.0


def cmd_out(ctx: Context, *, rule: FloorRule, wait_for_slot: bool) -> Result:
    ctx.phase = "out"
    snap = take_snapshot(ctx.clients, ctx.instance_id, ctx.group_name, gates=True)
    log_traffic_sources(ctx, snap.group)
    ctx.lifecycle = snap.me.lifecycle
    if snap.me.lifecycle in STANDBY_STATES:
        if ctx.dry_run:
            return Result(f"dry run: already {snap.me.lifecycle}; would wait for the drain to end")
        ctx.log.info(f"{ctx.instance_id} is already {snap.me.lifecycle}; only waiting")
        return finish_out(ctx, snap.group)
    drain = expected_drain(ctx, snap.group)
    last_start = ctx.waiter.deadline - drain_budget(drain)  # after it, the drain cannot fit
    wait_for_slot = wait_for_slot and not ctx.dry_run  # a dry run waits for nothing
    while True:
        if ctx.waiter.clock() > last_start:
            raise Refused(drain_does_not_fit(ctx, drain))
        snap = wait_for_gates(ctx, snap, rule=rule, wait_for_slot=wait_for_slot, until=last_start)
        if ctx.waiter.clock() > last_start:
            raise Refused(drain_does_not_fit(ctx, drain))
        if ctx.dry_run:
            return Result(f"dry run: would {', then '.join(out_plan(snap.group, rule, drain))}")
        try:
            take_out(ctx, snap.group, rule=rule)
        except Refused as e:
            if not wait_for_slot or ctx.waiter.clock() >= last_start:
                raise
            ctx.log.info(f"waiting for a slot: {e}")
        else:
            if keeps_its_slot(ctx, rule=rule):  # which just read every load balancer
                return finish_out_or_release(ctx, snap.group, expected=drain)
            yield_slot(ctx, expected=drain)
            if not wait_for_slot:
                raise Refused("yielded to a concurrent out that took the same slot")
        pause_before_recheck(ctx, until=last_start)
        snap = take_snapshot(ctx.clients, ctx.instance_id, ctx.group_name, gates=True)


def drain_does_not_fit(ctx: Context, drain: float) -> str:
    left = ctx.waiter.deadline - ctx.waiter.clock()
    return (
        f"load balancers may drain for {drain:.0f}s, which needs {drain_budget(drain):.0f}s with the time "
        f"AWS takes to reach Standby, but only {left:.0f}s of --timeout are left"
    )


def out_plan(group: Group, rule: FloorRule, drain: float) -> list[str]:
    plan = ["EnterStandby (desired capacity -1)", f"wait up to {drain:.0f}s for draining"]
    if must_hold_min_size(group, floor=rule.floor(group)):
        plan.insert(0, f"set MinSize {group.min_size} -> {rule.floor(group)}")
    return plan


def pause_before_recheck(ctx: Context, *, until: float) -> None:
    """Jittered, so that ten instances waiting for a slot do not poll in lock-step."""
    pause = random.uniform(0.5, 1.5) * max(ctx.waiter.poll * 3, 1.0)
    ctx.waiter.sleep(max(0.0, min(until - ctx.waiter.clock(), pause)))


def wait_for_gates(
    ctx: Context, snap: Snapshot, *, rule: FloorRule, wait_for_slot: bool, until: float
) -> Snapshot:
    """Refuse, or with --wait re-check until the gates pass or `until`, the last moment an
    out can start and still drain within --timeout."""
    while True:
        floor = rule.floor(snap.group)
        lasting, passing = lasting_refusals(snap, floor=floor), passing_refusals(snap, floor=floor)
        if not lasting and not passing:
            return snap
        if not wait_for_slot or lasting or snap.me.lifecycle != "InService" or ctx.waiter.clock() >= until:
            raise Refused("; ".join(lasting + passing))
        serving = len(serving_instances(snap.group, snap.health))
        ctx.log.info(
            f"waiting for a slot: {serving} of {snap.group.full_capacity} serving, "
            f"floor {floor} ({passing[0]})"
        )
        pause_before_recheck(ctx, until=until)
        snap = take_snapshot(ctx.clients, ctx.instance_id, ctx.group_name, gates=True)


def take_out(ctx: Context, group: Group, *, rule: FloorRule) -> None:
    target = rule.floor(group)
    hold = must_hold_min_size(group, floor=target)
    if hold and target > group.desired - 1:
        raise Refused(f"no free slot: desired capacity {group.desired} - 1 is below the floor {target}")
    with ctx.signals.deferred():  # a few quick calls: never stop between MinSize and Standby
        if hold:
            hold_min_size(ctx, group, floor=target)
        try:
            enter_standby(ctx, group.name)
        except BalancedError as e:
            release_after_failure(ctx)
            if is_min_size_error(e):
                raise Refused(f"no free slot: AWS refused EnterStandby below MinSize ({e.__cause__})") from e
            raise


STANDBY_ENTRY_RE = re.compile(r"Moving EC2 instance to Standby: (i-[0-9a-f]+)")
# How far back to look for EnterStandby start times; older entrants sort as oldest.
ENTRY_HISTORY = 100


def standby_entrants(clients: Clients, group: Group) -> list[str]:
    """Instances now out (EnteringStandby or, with a short drain, already Standby), oldest
    EnterStandby first: by the start of their latest standby activity, then by id."""
    out = {m.instance_id for m in group.members if m.lifecycle in STANDBY_STATES}
    started: dict[str, datetime.datetime] = {}
    pages = aws_pages(
        clients.autoscaling,
        "describe_scaling_activities",
        f"describe scaling activities of {group.name}",
        AutoScalingGroupName=group.name,
        PaginationConfig={"PageSize": 50, "MaxItems": ENTRY_HISTORY},
    )
    for activity in (a for page in pages for a in page.get("Activities", [])):
        match = STANDBY_ENTRY_RE.match(activity.get("Description", ""))
        if match and match.group(1) in out:
            started.setdefault(match.group(1), activity["StartTime"])
    oldest = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)  # entered before our history
    return sorted(out, key=lambda i: (started.get(i, oldest), i))


def yielders(entrants: list[str], *, deficit: int) -> list[str]:
    """The latest entrants give their slot back: exactly the excess, never all (someone
    raced first and keeps its slot), never none while the floor is broken by a race."""
    excess = min(deficit, len(entrants) - 1)
    return entrants[len(entrants) - excess :] if excess > 0 else []


def keeps_its_slot(ctx: Context, *, rule: FloorRule) -> bool:
    """Re-check the floor right after EnterStandby: a concurrent out may have read the same state."""
    snap = take_snapshot(ctx.clients, ctx.instance_id, ctx.group_name, gates=False)
    keep_record_alive(ctx, snap.group)
    needed = rule.floor(snap.group)
    serving = len(serving_instances(snap.group, snap.health))
    if serving >= needed:
        return True
    losers = yielders(standby_entrants(ctx.clients, snap.group), deficit=needed - serving)
    ctx.log.warning(
        f"floor broken by a concurrent out: {serving} serving, floor {needed}; yielding: {', '.join(losers)}"
    )
    return ctx.instance_id not in losers


def yield_slot(ctx: Context, *, expected: float) -> None:
    """Give the slot back: AWS allows ExitStandby only from Standby, so drain first."""
    group = describe_group(ctx.clients, ctx.group_name)
    finish_out(ctx, group, expected=expected)
    cmd_in(ctx)
    ctx.phase, ctx.yielded = "out", True
    ctx.actions.append("yielded the slot: back InService")


def release_after_failure(ctx: Context) -> None:
    try:
        release_min_size(ctx, describe_group(ctx.clients, ctx.group_name), back_in=False)
    except BalancedError as e:
        ctx.log.warning(f"could not restore MinSize: {e}")


def finish_out_or_release(ctx: Context, group: Group, *, expected: float) -> Result:
    """An instance that vanishes while draining can never come back to restore MinSize."""
    try:
        return finish_out(ctx, group, expected=expected, settle=True)
    except InstanceGone:
        release_after_failure(ctx)
        raise


def finish_out(ctx: Context, group: Group, *, expected: float = 0.0, settle: bool = False) -> Result:
    verdict = wait_until(OUT, ctx=ctx, group=group, expected=expected, settle=settle)
    ctx.lifecycle = "Standby"
    return Result(verdict.explanation)


def cmd_in(ctx: Context) -> Result:
    ctx.phase, acted = "in", False
    group = describe_group(ctx.clients, ctx.group_name)
    me = group.member(ctx.instance_id)
    if me is None:
        raise NoEnvironment(f"{ctx.instance_id} is no longer in Auto Scaling group {group.name}")
    log_traffic_sources(ctx, group)
    ctx.lifecycle = me.lifecycle
    if me.lifecycle == "EnteringStandby":
        if ctx.dry_run:
            return Result(
                "dry run: EnteringStandby; would wait for Standby, ExitStandby, then wait for health checks"
            )
        ctx.log.info("still EnteringStandby (an earlier out); waiting for Standby first")
        finish_out(ctx, group)
        group = describe_group(ctx.clients, ctx.group_name)
        me = group.member(ctx.instance_id) or me
    reasons = in_refusals(group, me)
    if reasons and me.lifecycle == "Standby":
        raise Refused("; ".join(reasons))
    if me.lifecycle == "Standby":
        if ctx.dry_run:
            return Result(
                "dry run: would ExitStandby, then wait for health checks", {"would": ["ExitStandby"]}
            )
        exit_standby(ctx, group.name)
        acted = True
        if MIN_SIZE_TAG in group.tags:  # release_min_size counts who is still out, ours gone
            group = describe_group(ctx.clients, ctx.group_name)
    elif me.lifecycle != "InService" and me.lifecycle not in PENDING_STATES:
        raise BalancedError(f"{ctx.instance_id} is {me.lifecycle}; cannot bring it back from there")
    elif ctx.dry_run:
        return Result(f"dry run: already {me.lifecycle}; would wait for health checks")
    else:
        ctx.log.info(f"{ctx.instance_id} is already {me.lifecycle}; only waiting")
    release_min_size(ctx, group, back_in=True)
    verdict = wait_until(IN, ctx=ctx, group=group, settle=acted)
    ctx.lifecycle = "InService"
    return Result(verdict.explanation)


def cmd_status(ctx: Context, *, rule: FloorRule) -> Result:
    snap = take_snapshot(ctx.clients, ctx.instance_id, ctx.group_name, gates=True)
    group = snap.group
    ctx.lifecycle = snap.me.lifecycle
    serving = serving_instances(group, snap.health)
    floor = rule.floor(group)
    reasons = out_refusals(snap, floor=floor)
    lines = [
        f"instance   {ctx.instance_id}  {snap.me.lifecycle}  {snap.me.health}",
        (
            f"group      {group.name}  min {group.min_size}  desired {group.desired}  max {group.max_size}"
            f"  out {group.out_count}  serving {len(serving)}/{group.full_capacity}  floor {floor}"
        ),
    ]
    for lb, states in snap.health.items():
        mine = states.get(ctx.instance_id)
        lines.append(f"lb         {lb.name}  {mine.describe() if mine else 'not registered'}  ({lb.id})")
    for source in group.unsupported_sources:
        lines.append(f"unchecked  {source}")
    if group.suspended:
        lines.append(f"suspended  {', '.join(sorted(group.suspended))}")
    if MIN_SIZE_TAG in group.tags:
        lines.append(f"tag        {MIN_SIZE_TAG}={group.tags[MIN_SIZE_TAG]}")
    peers = peer_states(group, snap.health, ctx.instance_id)
    not_serving = {i: state for i, state in peers.items() if state != "serving"}
    lines.append(f"peers      {len(peers) - len(not_serving)} of {len(peers)} others serving")
    lines += [f"peer       {i}  {state}" for i, state in sorted(not_serving.items())]
    lines.append("out now    " + ("allowed" if not reasons else "refused: " + "; ".join(reasons)))
    details = {
        "lifecycle_state": snap.me.lifecycle,
        "health_status": snap.me.health,
        "min_size": group.min_size,
        "desired_capacity": group.desired,
        "max_size": group.max_size,
        "serving": serving,
        "peers": peers,
        "floor": floor,
        "out_allowed": not reasons,
        "out_refusals": reasons,
        "load_balancers": [
            {"name": lb.name, "id": lb.id, "state": (s.get(ctx.instance_id) or LbState("unregistered")).state}
            for lb, s in snap.health.items()
        ],
        "text": lines,
    }
    return Result(f"{snap.me.lifecycle}, {len(serving)} of {group.full_capacity} serving", details)


def peer_states(group: Group, health: dict[LoadBalancer, dict[str, LbState]], me: str) -> dict[str, str]:
    """Every other instance: "serving", or why not."""
    serving = set(serving_instances(group, health))
    states = {}
    for m in group.members:
        if m.instance_id == me:
            continue
        if m.instance_id in serving:
            states[m.instance_id] = "serving"
            continue
        why = (
            [f"{m.lifecycle}/{m.health}"]
            if m.lifecycle != "InService" or m.health.lower() != "healthy"
            else []
        )
        for lb, states_in_lb in health.items():
            state = states_in_lb.get(m.instance_id)
            if not is_serving(state):
                why.append(f"{lb.name} {state.describe() if state else 'not registered'}")
        states[m.instance_id] = "; ".join(why)
    return states


def cmd_run(
    ctx: Context, *, rule: FloorRule, wait_for_slot: bool, argv: list[str], timeout: float, json_output: bool
) -> Result:
    """out, CMD, in. A failed CMD leaves the instance out: a broken server stays out of traffic."""
    cmd_out(ctx, rule=rule, wait_for_slot=wait_for_slot)
    if ctx.dry_run:
        return Result(f"dry run: would take the instance out, run {' '.join(argv)}, and put it back")
    ctx.log.info(f"running: {' '.join(argv)}")
    ctx.signals.disarm_deadline()  # --timeout bounds balanced's waits, not the deployment
    code = run_forwarding_signals(argv, stdout_to_stderr=json_output)  # stdout: one JSON object
    if code != 0:
        raise CommandFailed(code, argv)
    ctx.log.info("command succeeded; putting the instance back")
    ctx.set_deadline(timeout)  # in gets a full --timeout of its own
    return cmd_in(ctx)


def run_forwarding_signals(argv: list[str], *, stdout_to_stderr: bool) -> int:
    """Run CMD; SIGINT/SIGTERM reach it instead of interrupting us, so it can clean up."""
    try:
        child = subprocess.Popen(argv, stdout=sys.stderr if stdout_to_stderr else None)
    except OSError as e:
        raise BalancedError(f"cannot run {argv[0]}: {e.strerror}") from None

    def forward(signum: int, _frame: Any) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


###############################################################################
# Command line ################################################################
###############################################################################


def number_in_range(
    kind: Callable[[str], float], *, low: float, high: float, open_low: bool, what: str, span: str
) -> Callable[[str], float]:
    """An argparse type: a number of `kind` within [low, high] (or (low, high]); a bad one is
    exit 2 with a one-line reason."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not math.isfinite(value) or value < low or (open_low and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"must be {span}: {text!r}")
        return value

    return parse


positive_seconds = number_in_range(
    float, low=0, high=86400, open_low=True, what="a number of seconds", span="between 0 and 86400 seconds"
)
non_negative_int = number_in_range(
    int, low=0, high=math.inf, open_low=False, what="a whole number", span="0 or more"
)
percent = number_in_range(
    float, low=0, high=100, open_low=False, what="a percentage", span="between 0 and 100"
)


def instance_id_arg(text: str) -> str:
    if not INSTANCE_ID_RE.match(text):
        raise argparse.ArgumentTypeError(f"not an EC2 instance id (i-0123456789abcdef0): {text!r}")
    return text


def region_arg(text: str) -> str:
    if not REGION_RE.match(text):
        raise argparse.ArgumentTypeError(f"not an AWS region (e.g. us-east-1): {text!r}")
    return text


poll_seconds = number_in_range(
    float, low=0.05, high=60, open_low=False, what="a number of seconds", span="between 0.05 and 60 seconds"
)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        help="give up after this many seconds (default %(default).0f)",
    )
    parser.add_argument(
        "--poll",
        type=poll_seconds,
        default=DEFAULT_POLL,
        help="base poll interval in seconds (default %(default).0f)",
    )
    parser.add_argument(
        "--instance-id", type=instance_id_arg, help="skip the metadata lookup of the instance id"
    )
    parser.add_argument("--region", type=region_arg, help="skip the region lookup")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the gates and print the plan; change nothing"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with the result on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (ARNs, API details)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and the summary line")


def add_floor_options(parser: argparse.ArgumentParser, *, waits: bool = True) -> None:
    parser.add_argument(
        "--min-healthy",
        type=non_negative_int,
        default=1,
        help="other instances that must stay serving (default %(default)s)",
    )
    parser.add_argument(
        "--min-healthy-percent",
        type=percent,
        default=0.0,
        help="...and at least this percent of the group's full capacity (default %(default).0f)",
    )
    if not waits:
        return
    parser.add_argument(
        "--wait",
        action="store_true",
        help="when a gate refuses, re-check until it passes or --timeout runs out",
    )


def file_digest() -> str:
    """The first 12 hex digits of this file's sha256: proof of which copy a host runs."""
    import hashlib

    try:
        with open(__file__, "rb") as f:
            return "sha256 " + hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        return "sha256 unknown"


class Parser(argparse.ArgumentParser):
    """argparse, plus the summary line that every run ends with."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        command = self.prog.split()[1] if " " in self.prog else "?"
        summary = f"balanced: {command}: USAGE ({EXIT_USAGE}) (instance unknown): {message}"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n{summary}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="balanced",
        description="Take this EC2 instance out of its load balancers and back in, safely.",
        epilog="exit codes: 0 ok, 1 failed, 2 usage, 3 refused (nothing changed), "
        "4 timed out after acting, 5 environment, 130/143 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"balanced {__version__} ({file_digest()})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{out,in,status,run}")
    out = commands.add_parser("out", help="check safety, enter Standby, wait until drained and deregistered")
    add_common_options(out)
    add_floor_options(out)
    back = commands.add_parser("in", help="leave Standby, wait until InService and healthy everywhere")
    add_common_options(back)
    status = commands.add_parser("status", help="show the instance, its group and load balancers")
    add_common_options(status)
    add_floor_options(status, waits=False)
    run = commands.add_parser("run", help="out, then CMD, then in if CMD succeeded")
    add_common_options(run)
    add_floor_options(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    return parser


def next_step(code: int, ctx: Context | None, error: BaseException | None) -> str:
    """What the operator should do after a failure: first whatever AWS was already asked to do."""
    if isinstance(error, BalancedError) and error.advice:
        return error.advice
    if ctx is not None and (ctx.actions or ctx.attempting or code == EXIT_TIMEOUT):
        return where_it_was_left(ctx)
    if code == EXIT_REFUSED:
        return "nothing changed; safe to retry later"
    if code == EXIT_ENVIRONMENT:
        return "run it on an EC2 instance of an Auto Scaling group, with credentials"
    return "nothing was changed"


def where_it_was_left(ctx: Context) -> str:
    state = ctx.lifecycle or "mid-transition"
    if ctx.attempting:
        state = f"{state} ({ctx.attempting} was requested and may have been applied)"
    if ctx.yielded and ctx.lifecycle == "InService" and not ctx.attempting:
        return f"{ctx.instance_id} yielded its slot and is InService again; safe to retry later"
    if ctx.phase == "out" and ctx.lifecycle == "InService" and not ctx.attempting:
        return f"{ctx.instance_id} is InService, not out; safe to retry later"
    if ctx.phase == "out":
        return (
            f"{ctx.instance_id} left {state}; rerun 'balanced.py out' to finish waiting, "
            "or 'balanced.py in' to put it back"
        )
    return f"{ctx.instance_id} left {state}; rerun 'balanced.py in' to finish waiting"


def summary_line(
    command: str,
    outcome: str,
    code: int,
    ctx: Context | None,
    message: str,
    elapsed: float,
    error: BaseException | None,
) -> str:
    who = f"{ctx.instance_id} {ctx.group_name}".strip() if ctx else "(instance unknown)"
    text = f"balanced: {command}: {outcome} ({code}) {who}: {message}"
    if code != EXIT_OK:
        text += f"; {next_step(code, ctx, error)}"
    return f"{text} [{fmt_duration(elapsed)}]"


def unknown_region_hint(region: str | None) -> str:
    """Only on failure (it costs a start-up's worth of loading): botocore builds an endpoint
    for any region, so a typo shows up as a connection error."""
    import botocore.session

    if not region:
        return ""
    session = botocore.session.get_session()
    known = {
        r for p in session.get_available_partitions() for r in session.get_available_regions("autoscaling", p)
    }
    return "" if region in known else f" (region {region} is not one this botocore knows: a typo?)"


def build_context(args: argparse.Namespace, log: Log, started: float, signals: Signals) -> Context:
    environ = dict(os.environ)
    identity = resolve_identity(instance_id=args.instance_id, region=args.region, environ=environ)
    log.prefix = f"balanced {args.command} {identity.instance_id}"
    clients = make_clients(identity.region, environ)
    signals.activity = clients.activity
    clients.activity.log = log
    waiter = Waiter(log=log, deadline=started + args.timeout, poll=args.poll)
    ctx = Context(
        clients=clients,
        instance_id=identity.instance_id,
        log=log,
        waiter=waiter,
        signals=signals,
        dry_run=args.dry_run,
    )
    ctx.group_name = find_group_name(clients, identity.instance_id)
    log.debug(f"region {identity.region}, group {ctx.group_name}")

    return ctx


def run_command(args: argparse.Namespace, ctx: Context) -> Result:
    rule = FloorRule(getattr(args, "min_healthy", 1), getattr(args, "min_healthy_percent", 0.0))
    if args.command == "out":
        return cmd_out(ctx, rule=rule, wait_for_slot=args.wait)
    if args.command == "in":
        return cmd_in(ctx)
    if args.command == "status":
        return cmd_status(ctx, rule=rule)
    return cmd_run(
        ctx, rule=rule, wait_for_slot=args.wait, argv=args.cmd, timeout=args.timeout, json_output=args.json
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.cmd[:1] == ["--"]:
            args.cmd = args.cmd[1:]
        if not args.cmd:
            Parser(prog="balanced run").error(
                "run needs a command after --, e.g. balanced run -- sudo chef-client"
            )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    log = Log(level=VERBOSE if args.verbose else QUIET if args.quiet else NORMAL)
    signals = Signals()
    signals.install()
    signals.arm_deadline(args.timeout)
    ctx: Context | None = None
    error: BaseException | None = None
    details: dict[str, Any] = {}
    try:
        ctx = build_context(args, log, started, signals)
        result = run_command(args, ctx)
        code, message, details = EXIT_OK, result.message, result.details
    except DeadlinePassed as e:
        # Exit 4 promises "an action was taken"; before any, running out of time is a failure.
        error, message = e, str(e) + unknown_region_hint(args.region or os.environ.get("AWS_REGION"))
        code = EXIT_TIMEOUT if ctx and (ctx.actions or ctx.attempting) else EXIT_FAILED
    except (BalancedError, Interrupted) as e:
        error, code, message = e, e.exit_code, str(e)
    except Exception as e:  # noqa: BLE001 - the one place that turns surprises into exit 1
        error, code, message = e, EXIT_FAILED, f"internal error: {type(e).__name__}: {e}"
        if args.verbose:
            import traceback

            traceback.print_exc()
        else:
            message += " (rerun with -v for the traceback)"
    signals.disarm_deadline()
    signals.deferring = True  # the outcome is decided: a late signal must not garble the report
    elapsed = time.monotonic() - started
    if args.command == "status" and code == EXIT_OK and not args.json:
        print("\n".join(details.pop("text", [])))
    outcome = getattr(error, "outcome", None) or OUTCOMES.get(code, "FAILED")
    if args.json:
        details.pop("text", None)
        print(json.dumps(result_json(args.command, outcome, code, message, ctx, elapsed, details)))
    print(
        summary_line(args.command, outcome, code, ctx, message, elapsed, error), file=sys.stderr, flush=True
    )
    return code


def result_json(
    command: str,
    outcome: str,
    code: int,
    message: str,
    ctx: Context | None,
    elapsed: float,
    details: dict[str, Any],
) -> dict[str, Any]:
    return {
        "command": command,
        "outcome": outcome,
        "exit_code": code,
        "message": message,
        "instance_id": ctx.instance_id if ctx else None,
        "group": ctx.group_name if ctx else None,
        "lifecycle_state": ctx.lifecycle if ctx else None,
        "actions": ctx.actions if ctx else [],
        "elapsed_seconds": round(elapsed, 3),
        **details,
    }


if __name__ == "__main__":
    sys.exit(main())
