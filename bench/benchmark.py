"""balanced.py benchmark (issue 5): run on demand, never part of CI's pass/fail.

    python -m bench.benchmark [--runs N] [--quick] [--output FILE]

Everything runs against the local AWS of the test suite (tests/localaws.py: moto's server extended
in-process to drain and health-check like AWS, recording every API request) with delays of the
order AWS has, and balanced.py runs as a subprocess with its DEFAULT polling, as an operator runs it.
The report (markdown) goes to stdout, and to --output if given. See bench/README.md.

Sections: detection latency; API calls per out+in cycle and per poll; scale (500 instances);
start-up and --help; the aws CLI baseline (enter-standby + elbv2 wait), with ratios from the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tests.localaws import Call, Group, LocalAWS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "balanced.py"
PYTHON = sys.executable  # the interpreter itself, not a shim (pyenv shims add ~50 ms per spawn)
ACTIONS = {"out": "EnterStandby", "in": "ExitStandby"}
ASG_SERVICE = "autoscaling"
LB_SERVICE = "elasticloadbalancing"
MONITOR_INTERVAL = 0.01

# Targets from issue 5, for the defaults.
TARGET_LATENCY = 1.0  # median detection latency, s, for out and for in
TARGET_ASG_INTERVAL = 5.0  # while waiting: on average at most one Auto Scaling call per 5 s
TARGET_LB_RATE = 1.0  # while waiting: at most one call per second per load balancer
TARGET_GATE_CALLS = 6  # gate and resolution phase of out, group with one target group
TARGET_STARTUP = 0.3  # process start-up to first API call, s


###############################################################################
# Settings ####################################################################
###############################################################################


@dataclass(frozen=True)
class Settings:
    runs: int  # out+in cycles for the latency runs (1 target group)
    mixed_runs: int  # cycles for the group with 5 target groups and 2 classic ELBs
    baseline_runs: int  # aws CLI cycles (its waiters poll every 15 s)
    startup_runs: int
    drain: float  # deregistration delay / connection-draining timeout, s
    health: float  # ExitStandby -> healthy in every LB, s
    pending: float  # ExitStandby -> InService in the ASG, s
    scale_size: int
    scale_drain: float
    scale_health: float

    @classmethod
    def of(cls, *, runs: int | None, quick: bool, scale_size: int | None) -> Settings:
        if quick:
            return cls(
                runs=runs or 2,
                mixed_runs=1,
                baseline_runs=1,
                startup_runs=3,
                drain=8.0,
                health=4.0,
                pending=1.0,
                scale_size=scale_size or 100,
                scale_drain=4.0,
                scale_health=2.0,
            )
        return cls(
            runs=runs or 5,
            mixed_runs=2,
            baseline_runs=2,
            startup_runs=7,
            drain=20.0,
            health=10.0,
            pending=2.0,
            scale_size=scale_size or 500,
            scale_drain=10.0,
            scale_health=5.0,
        )


###############################################################################
# Running a process and watching the local AWS ################################
###############################################################################


@dataclass
class Proc:
    argv: list[str]
    code: int
    spawned: float  # time.monotonic() just before the spawn
    exited: float  # time.monotonic() when the process was reaped
    stdout: str
    stderr: str
    cpu: float = 0.0  # user + system CPU seconds of the process

    @property
    def wall(self) -> float:
        return self.exited - self.spawned


def run_process(argv: list[str], env: dict[str, str]) -> Proc:
    """Spawn, reap, and time it (wall and CPU); output goes to temporary files so that the exit
    is seen at once. balanced.py bounds itself with --timeout (600 s by default)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        spawned = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        exited = time.monotonic()
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        return Proc(argv, code, spawned, exited, stdout, stderr, usage.ru_utime + usage.ru_stime)


def balanced_argv(command: str, instance_id: str, *extra: str) -> list[str]:
    """Default polling: no --poll. --instance-id/--region skip the metadata service."""
    return [PYTHON, str(SCRIPT), command, "--instance-id", instance_id, "--region", "us-east-1", *extra]


class Monitor:
    """Watches the local AWS every MONITOR_INTERVAL seconds (in-process, no API calls) and records
    the first moment a condition holds: the moment AWS finished a transition."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        self.condition = condition
        self.first_true: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            seen = time.monotonic()
            if self.condition():
                self.first_true = seen
                return
            self._stop.wait(MONITOR_INTERVAL)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def is_out(aws: LocalAWS, group: Group, iid: str) -> bool:
    """Standby, and deregistered (not draining) from every target group and classic ELB."""
    return (
        aws.lifecycle(iid) == "Standby"
        and all(aws.target_state(iid, arn) == "unused" for arn in group.tg_arns)
        and all(aws.elb_state(iid, name)[0] == "OutOfService" for name in group.elb_names)
    )


def is_in(aws: LocalAWS, group: Group, iid: str) -> bool:
    """InService, and healthy in every target group and classic ELB."""
    return (
        aws.lifecycle(iid) == "InService"
        and all(aws.target_state(iid, arn) == "healthy" for arn in group.tg_arns)
        and all(aws.elb_state(iid, name) == ("InService", "N/A") for name in group.elb_names)
    )


CONDITIONS: dict[str, Callable[[LocalAWS, Group, str], bool]] = {"out": is_out, "in": is_in}


class BenchAWS(LocalAWS):
    """The local AWS with /20 subnets instead of make_group's /24s, so that a group of 500
    instances (plus the load balancers' addresses) fits in its two subnets."""

    def client(self, service: str, max_attempts: int | None = None, internal: bool = False) -> Any:
        client = super().client(service, max_attempts, internal)
        if service == "ec2":
            client.meta.events.register("provide-client-params.ec2.CreateSubnet", widen_subnet)
        return client


def widen_subnet(params: dict[str, Any], **_: Any) -> None:
    match = re.fullmatch(r"10\.0\.(\d+)\.0/24", params.get("CidrBlock", ""))
    if match:
        params["CidrBlock"] = f"10.0.{int(match.group(1)) * 16}.0/20"


###############################################################################
# One measured command and what its API calls say #############################
###############################################################################


def op_name(call: Call) -> str:
    """The operation, with health reads split into "one instance" (the wait loop) and "all"."""
    if call.action == "DescribeTargetHealth":
        return call.action + ("" if "Targets.member.1.Id" in call.params else " (all targets)")
    if call.action == "DescribeInstanceHealth":
        return call.action + ("" if "Instances.member.1.InstanceId" in call.params else " (all instances)")
    return call.action


def lb_of(call: Call) -> str | None:
    """The load balancer a health/attribute call is about."""
    return call.params.get("TargetGroupArn") or call.params.get("LoadBalancerName")


def is_poll_call(call: Call) -> bool:
    """A health read of this one instance: what the wait loop sends to every LB on every poll."""
    return op_name(call) in ("DescribeTargetHealth", "DescribeInstanceHealth")


@dataclass
class Measured:
    """One balanced.py (or baseline) command: process, AWS transition moment, API calls."""

    scenario: str
    command: str
    proc: Proc
    transition: float | None  # first moment the local AWS had finished the transition
    calls: list[Call]
    lbs: int

    @property
    def ok(self) -> bool:
        return self.proc.code == 0

    @property
    def latency(self) -> float | None:
        return None if self.transition is None else self.proc.exited - self.transition

    @property
    def startup(self) -> float | None:
        return self.calls[0].time - self.proc.spawned if self.calls else None

    @property
    def action_index(self) -> int | None:
        action = ACTIONS.get(self.command)
        return next((i for i, c in enumerate(self.calls) if c.action == action), None)

    @property
    def gate_calls(self) -> list[Call]:
        i = self.action_index
        return self.calls if i is None else self.calls[:i]

    @property
    def wait_calls(self) -> list[Call]:
        i = self.action_index
        return [] if i is None else self.calls[i + 1 :]

    @property
    def wait_window(self) -> float:
        """From the action (EnterStandby/ExitStandby) to the exit: the waiting part."""
        i = self.action_index
        return 0.0 if i is None else self.proc.exited - self.calls[i].time

    @property
    def loop_calls(self) -> list[Call]:
        """The wait loop's calls: from its first health read of this instance to the exit."""
        calls = self.wait_calls
        first = next((i for i, c in enumerate(calls) if is_poll_call(c)), len(calls))
        return calls[first:]

    @property
    def one_off_calls(self) -> list[Call]:
        """Calls between the action and the wait loop (floor re-check, group re-read)."""
        return self.wait_calls[: len(self.wait_calls) - len(self.loop_calls)]

    @property
    def polls(self) -> float:
        return sum(1 for c in self.wait_calls if is_poll_call(c)) / max(self.lbs, 1)

    def wait_by_service(self, service: str) -> list[Call]:
        return [c for c in self.wait_calls if c.service == service]

    def min_lb_gap(self) -> float | None:
        """Smallest time between two calls about the same LB while waiting."""
        times: dict[str, list[float]] = {}
        for c in self.wait_calls:
            lb = lb_of(c)
            if lb and c.service == LB_SERVICE:
                times.setdefault(lb, []).append(c.time)
        gaps = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
        return min(gaps) if gaps else None

    def failed_calls(self) -> list[Call]:
        return [c for c in self.calls if not c.ok]


def measure(
    aws: LocalAWS,
    group: Group,
    iid: str,
    scenario: str,
    command: str,
    argv_list: Sequence[list[str]],
    *,
    watch: bool = True,
    env: dict[str, str] | None = None,
) -> Measured:
    """Run one or more processes in sequence (the baseline needs two) as one measured command."""
    aws.clear_calls()
    condition = CONDITIONS.get(command) if watch else None
    monitor = Monitor(lambda: condition(aws, group, iid)) if condition else None
    procs: list[Proc] = []
    with monitor or _null():
        for argv in argv_list:
            proc = run_process(argv, env or aws.env())
            procs.append(proc)
            if proc.code != 0:
                break
    combined = Proc(
        argv=[a for p in procs for a in (*p.argv, ";")],
        code=procs[-1].code,
        spawned=procs[0].spawned,
        exited=procs[-1].exited,
        stdout="".join(p.stdout for p in procs),
        stderr="".join(p.stderr for p in procs),
        cpu=sum(p.cpu for p in procs),
    )
    lbs = len(group.tg_arns) + len(group.elb_names)
    m = Measured(scenario, command, combined, monitor.first_true if monitor else None, aws.calls, lbs)
    if not m.ok:
        print(f"!! {scenario} {command} exited {combined.code}:\n{combined.stderr}", file=sys.stderr)
    return m


@contextmanager
def _null() -> Iterator[None]:
    yield


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


###############################################################################
# Scenarios ###################################################################
###############################################################################


@dataclass
class ScaleResult:
    size: int
    status: Measured
    out: Measured
    back: Measured
    problems: list[str]
    answer_bytes: dict[str, int]  # size of AWS's answer to each polling request, by operation


@dataclass
class Results:
    settings: Settings
    cycles: dict[str, list[tuple[Measured, Measured]]] = field(default_factory=dict)  # scenario -> out/in
    scale: list[ScaleResult] = field(default_factory=list)
    startup: list[Measured] = field(default_factory=list)
    startup_imds: list[Measured] = field(default_factory=list)
    help_walls: list[float] = field(default_factory=list)
    bare_python: list[float] = field(default_factory=list)
    help_modules: int = 0
    help_imports_boto: bool = False
    baseline: list[tuple[Measured, Measured]] = field(default_factory=list)
    elapsed: float = 0.0
    machine: list[str] = field(default_factory=list)  # taken before the run: balanced.py may change
    errors: list[str] = field(default_factory=list)


def make_group(aws: LocalAWS, s: Settings, *, size: int, tgs: int, elbs: int, scale: bool = False) -> Group:
    aws.reset()
    drain, health = (s.scale_drain, s.scale_health) if scale else (s.drain, s.health)
    return aws.make_group(
        name=f"bench-{size}x{tgs}tg{elbs}elb",
        size=size,
        min_size=1,  # the operator's MinSize leaves room: no MinSize change, as in most groups
        max_size=size + 2,
        target_groups=tgs,
        classic_elbs=elbs,
        deregistration_delay=drain,
        connection_draining=drain,
        health_seconds=health,
        pending_seconds=min(s.pending, health),
    )


def balanced_cycles(
    aws: LocalAWS, s: Settings, scenario: str, *, tgs: int, elbs: int, runs: int
) -> list[tuple[Measured, Measured]]:
    group = make_group(aws, s, size=4, tgs=tgs, elbs=elbs)
    iid = group.instance_ids[0]
    cycles = []
    # A drain ends exactly a deregistration delay after EnterStandby, and balanced reads that
    # delay. Health checks pass on the load balancer's own schedule, not in step with
    # ExitStandby: each cycle draws its time to healthy from [0.9, 1.1] x the setting, or a fixed
    # time would line up with the poll interval and measure that coincidence instead.
    rng = random.Random(len(scenario))
    for n in range(runs):
        progress(f"{scenario}: cycle {n + 1}/{runs}")
        out = measure(aws, group, iid, scenario, "out", [balanced_argv("out", iid)])
        aws.health_seconds = s.health * rng.uniform(0.9, 1.1)
        back = measure(aws, group, iid, scenario, "in", [balanced_argv("in", iid)])
        cycles.append((out, back))
    return cycles


def baseline_cycles(aws: LocalAWS, s: Settings, runs: int) -> list[tuple[Measured, Measured]]:
    """What a user would otherwise script, with the aws CLI from PyPI, same group shape."""
    group = make_group(aws, s, size=4, tgs=1, elbs=0)
    iid, tg = group.instance_ids[0], group.tg_arns[0]
    aws_cli = [PYTHON, "-m", "awscli"]
    asg_args = ["--auto-scaling-group-name", group.name, "--instance-ids", iid]
    tg_args = ["--target-group-arn", tg, "--targets", f"Id={iid}"]
    out_argv = [
        [*aws_cli, "autoscaling", "enter-standby", *asg_args, "--should-decrement-desired-capacity"],
        [*aws_cli, "elbv2", "wait", "target-deregistered", *tg_args],
    ]
    in_argv = [
        [*aws_cli, "autoscaling", "exit-standby", *asg_args],
        [*aws_cli, "elbv2", "wait", "target-in-service", *tg_args],
    ]
    env = aws.env(AWS_DEFAULT_REGION="us-east-1")  # awscli v1 ignores AWS_REGION
    cycles = []
    for n in range(runs):
        progress(f"aws CLI baseline: cycle {n + 1}/{runs}")
        out = measure(aws, group, iid, "aws CLI", "out", out_argv, env=env)
        if out.ok:  # the waiter does not wait for Standby; the next exit-standby needs it
            wait_for(lambda: aws.lifecycle(iid) == "Standby")
        back = measure(aws, group, iid, "aws CLI", "in", in_argv, env=env)
        wait_for(lambda: is_in(aws, group, iid))
        cycles.append((out, back))
    return cycles


def wait_for(condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("the local AWS did not converge")
        time.sleep(0.05)


def scale_runs(aws: LocalAWS, s: Settings, size: int) -> ScaleResult:
    """status, out, in on a group of `size` instances behind 5 target groups; checks that the
    answers cover the whole group (pagination) and that AWS converged."""
    progress(f"scale: building a group of {size} instances x 5 target groups")
    group = make_group(aws, s, size=size, tgs=5, elbs=0, scale=True)
    iid = group.instance_ids[size // 2]
    scenario = f"{size} instances"
    progress(f"scale: {size} instances: status, out, in")
    status = measure(
        aws, group, iid, scenario, "status", [balanced_argv("status", iid, "--json")], watch=False
    )
    out = measure(aws, group, iid, scenario, "out", [balanced_argv("out", iid)])
    back = measure(aws, group, iid, scenario, "in", [balanced_argv("in", iid)])
    problems = []
    if status.ok:
        details = json.loads(status.proc.stdout)
        if len(details.get("serving", [])) != size:
            problems.append(f"status sees {len(details.get('serving', []))} of {size} serving")
        if len(details.get("load_balancers", [])) != 5:
            problems.append(f"status sees {len(details.get('load_balancers', []))} of 5 target groups")
    for m in (status, out, back):
        if not m.ok:
            problems.append(f"{m.command} exited {m.proc.code}")
        if m.failed_calls():
            problems.append(f"{m.command}: {len(m.failed_calls())} failed calls")
    if out.transition is None or back.transition is None:
        problems.append("the local AWS did not reach the target state")
    return ScaleResult(size, status, out, back, problems, answer_bytes(aws, group, iid))


def answer_bytes(aws: LocalAWS, group: Group, iid: str) -> dict[str, int]:
    """Bytes of AWS's answer to each request the commands send, on this group (unrecorded calls)."""
    sizes: dict[str, int] = {}

    def grab(http_response: Any, model: Any, **_: Any) -> None:
        sizes[model.name] = len(http_response.content)

    asg, elbv2 = aws.client("autoscaling", internal=True), aws.client("elbv2", internal=True)
    for client in (asg, elbv2):
        client.meta.events.register("after-call.*.*", grab)
    elbv2.describe_target_health(TargetGroupArn=group.tg_arns[0], Targets=[{"Id": iid}])
    result = {"DescribeTargetHealth": sizes["DescribeTargetHealth"]}
    elbv2.describe_target_health(TargetGroupArn=group.tg_arns[0])
    result["DescribeTargetHealth (all targets)"] = sizes["DescribeTargetHealth"]
    asg.describe_auto_scaling_instances(InstanceIds=[iid])
    asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group.name])
    result.update({k: sizes[k] for k in ("DescribeAutoScalingInstances", "DescribeAutoScalingGroups")})
    return result


def startup_runs(aws: LocalAWS, s: Settings, results: Results) -> None:
    from tests.imds import FakeIMDS

    progress("start-up: status runs, --help")
    group = make_group(aws, s, size=4, tgs=1, elbs=0)
    iid = group.instance_ids[0]
    for _ in range(s.startup_runs):
        results.startup.append(
            measure(aws, group, iid, "startup", "status", [balanced_argv("status", iid)], watch=False)
        )
    with FakeIMDS(instance_id=iid) as imds:
        env = aws.env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint, AWS_REGION=None)
        for _ in range(s.startup_runs):
            aws.clear_calls()
            proc = run_process([PYTHON, str(SCRIPT), "status"], env)
            results.startup_imds.append(Measured("startup+imds", "status", proc, None, aws.calls, 1))
    env = dict(os.environ)
    for _ in range(s.startup_runs):
        results.help_walls.append(run_process([PYTHON, str(SCRIPT), "--help"], env).wall)
        results.bare_python.append(run_process([PYTHON, "-c", "pass"], env).wall)
    imports = run_process([PYTHON, "-X", "importtime", str(SCRIPT), "--help"], env).stderr
    modules = [
        line.split("|")[-1].strip() for line in imports.splitlines() if line.startswith("import time:")
    ]
    results.help_modules = len(modules) - 1  # minus the header line
    results.help_imports_boto = any(m.split(".")[0] in ("boto3", "botocore") for m in modules)


def run_all(s: Settings) -> Results:
    results = Results(s, machine=machine())
    started = time.monotonic()
    with BenchAWS() as aws:

        def step(name: str, action: Callable[[], None]) -> None:
            """One section; a failure is reported, and the other sections still run."""
            try:
                action()
            except Exception as e:  # noqa: BLE001 - a benchmark reports what it could measure
                results.errors.append(f"{name}: {type(e).__name__}: {e}")
                progress(f"{name} FAILED: {type(e).__name__}: {e}")

        def cycles(name: str, tgs: int, elbs: int, runs: int) -> None:
            results.cycles[name] = balanced_cycles(aws, s, name, tgs=tgs, elbs=elbs, runs=runs)

        step("1 TG cycles", lambda: cycles("1 TG", 1, 0, s.runs))
        step("5 TG + 2 ELB cycles", lambda: cycles("5 TG + 2 ELB", 5, 2, s.mixed_runs))
        step("baseline", lambda: results.baseline.extend(baseline_cycles(aws, s, s.baseline_runs)))

        def scale(size: int) -> Callable[[], None]:
            return lambda: results.scale.append(scale_runs(aws, s, size))

        for size in (5, s.scale_size):
            step(f"scale {size}", scale(size))
        step("start-up", lambda: startup_runs(aws, s, results))
    results.elapsed = time.monotonic() - started
    return results


###############################################################################
# Report ######################################################################
###############################################################################


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def secs(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def fmt_num(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def machine() -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(re.findall(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[0])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError):
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "balanced.py"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit, dirty = "?", ""
    digest = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:12]
    versions = ", ".join(f"{p} {version(p)}" for p in ("boto3", "botocore", "moto", "awscli"))
    return [
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPUs ({cpu}), {mem} RAM",
        f"- Python {platform.python_version()}; {versions}",
        f"- balanced.py at commit {commit}{' + uncommitted changes' if dirty else ''} (sha256 {digest})",
    ]


def latency_section(r: Results) -> tuple[str, dict[str, float | None]]:
    rows = []
    medians: dict[str, float | None] = {}
    for scenario, cycles in r.cycles.items():
        for i, command in enumerate(("out", "in")):
            ms = [c[i] for c in cycles]
            lat = [m.latency for m in ms if m.ok and m.latency is not None]
            walls = [m.proc.wall for m in ms if m.ok]
            med = median(lat)
            if scenario == "1 TG":
                medians[command] = med
            rows.append(
                [
                    scenario,
                    command,
                    f"{sum(m.ok for m in ms)}/{len(ms)}",
                    secs(med),
                    secs(max(lat) if lat else None),
                    secs(min(lat) if lat else None),
                    secs(median(walls), 1),
                ]
            )
    s = r.settings
    text = "\n".join(
        [
            "## 1. Detection latency",
            "",
            f"Deregistration delay / connection draining {s.drain:.0f} s; LB health after ExitStandby "
            f"{s.health:.0f} s (InService in the ASG after {min(s.pending, s.health):.0f} s). Latency = "
            "process exit minus the first moment the local AWS had finished the transition (Standby and "
            "deregistered everywhere / InService and healthy everywhere), observed in-process every "
            f"{MONITOR_INTERVAL * 1000:.0f} ms. Includes the interpreter's exit.",
            "",
            table(["group", "command", "ok", "median s", "max s", "min s", "median wall s"], rows),
        ]
    )
    return text, medians


def counts_by_op(ms: Sequence[Measured]) -> Counter[str]:
    total: Counter[str] = Counter()
    for m in ms:
        total.update(op_name(c) for c in m.calls)
    return total


def calls_section(r: Results) -> tuple[str, dict[str, object]]:
    scenarios = list(r.cycles)
    ops: dict[str, dict[str, float]] = {}
    for scenario in scenarios:
        cycles = r.cycles[scenario]
        n = len(cycles)
        for label, ms in (("out", [c[0] for c in cycles]), ("in", [c[1] for c in cycles])):
            for op, count in counts_by_op(ms).items():
                ops.setdefault(op, {})[f"{scenario} {label}"] = count / n
    headers = ["operation"]
    for scenario in scenarios:
        headers += [f"{scenario} out", f"{scenario} in", f"{scenario} cycle"]
    rows = []
    totals = dict.fromkeys(headers[1:], 0.0)
    for op in sorted(ops):
        row: list[object] = [op]
        for scenario in scenarios:
            o, i = ops[op].get(f"{scenario} out", 0.0), ops[op].get(f"{scenario} in", 0.0)
            for h, v in ((f"{scenario} out", o), (f"{scenario} in", i), (f"{scenario} cycle", o + i)):
                totals[h] += v
                row.append(fmt_num(v) if v else "")
        rows.append(row)
    rows.append(["**total**", *(f"**{fmt_num(totals[h])}**" for h in headers[1:])])

    # Gate phase of out (before EnterStandby).
    gate_rows = []
    gate_worst = 0
    for scenario in scenarios:
        outs = [c[0] for c in r.cycles[scenario]]
        gates = [len(m.gate_calls) for m in outs]
        ops_first = ", ".join(f"{op_name(c)}" for c in outs[0].gate_calls)
        if scenario == "1 TG":
            gate_worst = max(gates)
        gate_rows.append([scenario, fmt_num(statistics.mean(gates)), max(gates), ops_first])

    # While waiting.
    wait_rows = []
    worst_asg_interval = {"out": float("inf"), "in": float("inf")}
    worst_lb_rate = {"out": 0.0, "in": 0.0}
    worst_lb_gap = {"out": float("inf"), "in": float("inf")}
    for scenario in scenarios:
        for i, command in enumerate(("out", "in")):
            ms = [c[i] for c in r.cycles[scenario] if c[i].ok]
            if not ms:
                continue
            window = sum(m.wait_window for m in ms)
            polls = sum(m.polls for m in ms)
            asg = sum(len(m.wait_by_service(ASG_SERVICE)) for m in ms)
            lb = sum(len(m.wait_by_service(LB_SERVICE)) for m in ms)
            lbs = ms[0].lbs
            per_poll: Counter[str] = Counter()
            one_off: Counter[str] = Counter()
            for m in ms:
                per_poll.update(op_name(c) for c in m.loop_calls)
                one_off.update(op_name(c) for c in m.one_off_calls)
            one_off_text = ", ".join(f"{op} {n / len(ms):.1f}" for op, n in sorted(one_off.items()))
            per_poll_text = ", ".join(f"{op} {per_poll[op] / polls:.2f}" for op in sorted(per_poll))
            asg_interval = window / asg if asg else float("inf")
            lb_rate = lb / window / lbs if window else 0.0
            worst_asg_interval[command] = min(worst_asg_interval[command], asg_interval)
            worst_lb_rate[command] = max(worst_lb_rate[command], lb_rate)
            gaps = [g for m in ms if (g := m.min_lb_gap()) is not None]
            if gaps:
                worst_lb_gap[command] = min(worst_lb_gap[command], min(gaps))
            wait_rows.append(
                [
                    scenario,
                    command,
                    secs(window / len(ms), 1),
                    fmt_num(polls / len(ms)),
                    one_off_text or "none",
                    per_poll_text,
                    f"{asg / len(ms):.1f}",
                    secs(asg_interval, 1),
                    secs(lb_rate),
                    secs(min(gaps) if gaps else None),
                ]
            )
    text = "\n".join(
        [
            "## 2. API calls",
            "",
            "### Per out+in cycle, by operation (mean over the cycles)",
            "",
            "`(all targets)`/`(all instances)`: a health read of every instance of the LB (gates, floor "
            "re-check); without it, a read of this one instance (the wait loop).",
            "",
            table(headers, rows),
            "",
            "### Gate and resolution phase of `out` (calls before EnterStandby)",
            "",
            table(["group", "mean calls", "max calls", "operations (first run)"], gate_rows),
            "",
            "### While waiting (from EnterStandby/ExitStandby to the exit; action itself excluded)",
            "",
            "A poll = one round of per-instance health reads, one per load balancer. One-off calls: "
            "between the action and the first poll (floor re-check after EnterStandby, group re-read "
            "after ExitStandby), per run. Wait-loop calls per poll: every call from the first poll to "
            "the exit, divided by the polls. ASG and LB rates count every call of the window.",
            "",
            table(
                [
                    "group",
                    "command",
                    "window s",
                    "polls",
                    "one-off calls after the action",
                    "wait-loop calls per poll, by operation",
                    "ASG calls",
                    "s per ASG call",
                    "LB calls/s per LB",
                    "min gap same LB s",
                ],
                wait_rows,
            ),
        ]
    )
    return text, {"gate": gate_worst, "asg": worst_asg_interval, "lb": worst_lb_rate, "gap": worst_lb_gap}


def wait_bytes_per_poll(m: Measured, sizes: dict[str, int]) -> float | None:
    """Bytes AWS answers per poll while waiting, from the measured answer size of each operation."""
    if not m.polls:
        return None
    return sum(sizes.get(op_name(c), 0) for c in m.loop_calls) / m.polls


def scale_section(r: Results) -> tuple[str, dict[str, bool]]:
    rows = []
    calls_per_poll: dict[int, float] = {}
    bytes_per_poll: dict[int, float] = {}
    all_ok = True
    for sr in r.scale:
        all_ok = all_ok and not sr.problems
        for m in (sr.status, sr.out, sr.back):
            ops = Counter(op_name(c) for c in m.calls)
            ops_text = ", ".join(f"{op} {n}" for op, n in sorted(ops.items()))
            poll_calls = len(m.loop_calls) / m.polls if m.polls else None
            poll_bytes = wait_bytes_per_poll(m, sr.answer_bytes)
            if poll_calls is not None and poll_bytes is not None:
                calls_per_poll[sr.size] = max(calls_per_poll.get(sr.size, 0.0), poll_calls)
                bytes_per_poll[sr.size] = max(bytes_per_poll.get(sr.size, 0.0), poll_bytes)
            rows.append(
                [
                    sr.size,
                    m.command,
                    m.proc.code,
                    secs(m.proc.wall),
                    secs(m.proc.cpu),
                    secs(m.latency),
                    len(m.calls),
                    secs(poll_calls),
                    "n/a" if poll_bytes is None else f"{poll_bytes / 1024:.1f}",
                    ops_text,
                ]
            )
        if sr.problems:
            rows.append([sr.size, "checks", "", "", "", "", "", "", "", "**" + "; ".join(sr.problems) + "**"])
    sizes = sorted(calls_per_poll)
    # Poll counts vary a little with the jittered schedule: 10 % tolerance.
    calls_flat = len(sizes) >= 2 and calls_per_poll[sizes[-1]] <= 1.1 * calls_per_poll[sizes[0]]
    bytes_growth = bytes_per_poll[sizes[-1]] / bytes_per_poll[sizes[0]] if len(sizes) >= 2 else 1.0
    bytes_flat = bytes_growth < 1.5
    answer_ops = sorted({op for sr in r.scale for op in sr.answer_bytes})
    answer_rows = [[op, *(f"{sr.answer_bytes.get(op, 0):,}" for sr in r.scale)] for op in answer_ops]
    s = r.settings
    text = "\n".join(
        [
            "## 3. Scale",
            "",
            f"5 target groups, deregistration delay {s.scale_drain:.0f} s, health {s.scale_health:.0f} s. "
            "Checks: `status --json` must count every instance serving and see all 5 target groups "
            "(the answers cover the whole group), out/in must converge with no failed call. "
            "Per poll: the wait loop's calls (first poll to exit), and the same weighted by the size of "
            "AWS's answer to each (measured below), divided by the polls.",
            "",
            table(
                [
                    "instances",
                    "command",
                    "exit",
                    "wall s",
                    "CPU s",
                    "latency s",
                    "calls",
                    "loop calls per poll",
                    "loop KiB per poll",
                    "operations",
                ],
                rows,
            ),
            "",
            "Size of AWS's answer (bytes) to each request, by group size:",
            "",
            table(["request", *(f"{sr.size} instances" for sr in r.scale)], answer_rows),
            "",
            f"Calls per poll {'do not grow' if calls_flat else '**grow**'} with the number of instances ("
            + ", ".join(f"{n}: {calls_per_poll[n]:.2f}" for n in sizes)
            + f"); bytes per poll {'do not grow' if bytes_flat else f'**grow {bytes_growth:.1f}x**'} ("
            + ", ".join(f"{n}: {bytes_per_poll[n] / 1024:.1f} KiB" for n in sizes)
            + ")"
            + ("." if all_ok else "; **some checks failed** (see the table)."),
        ]
    )
    return text, {"checks": all_ok, "calls": calls_flat, "bytes": bytes_flat}


def startup_section(r: Results) -> tuple[str, float | None]:
    def row(label: str, xs: list[float]) -> list[object]:
        return [label, len(xs), secs(median(xs), 3), secs(max(xs) if xs else None, 3)]

    first = [x for m in r.startup if (x := m.startup) is not None]
    first_imds = [x for m in r.startup_imds if (x := m.startup) is not None]
    every = [x for cycles in r.cycles.values() for c in cycles for m in c if (x := m.startup) is not None]
    text = "\n".join(
        [
            "## 4. Start-up and --help",
            "",
            "From the spawn of the process to the first API request the local AWS received.",
            "",
            table(
                ["measure", "runs", "median s", "max s"],
                [
                    row("status, --instance-id/--region: spawn to first API call", first),
                    row("status via the (fake, local) IMDSv2: spawn to first API call", first_imds),
                    row("every out/in of section 1: spawn to first API call", every),
                    row("`balanced.py --help`: whole process", r.help_walls),
                    row("`python -c pass`: the interpreter alone, for reference", r.bare_python),
                ],
            ),
            "",
            f"`--help` imports {r.help_modules} modules (`-X importtime`); boto3/botocore "
            f"{'ARE' if r.help_imports_boto else 'are not'} among them.",
        ]
    )
    return text, median(first)


def baseline_section(r: Results) -> str:
    rows = []
    ours = r.cycles.get("1 TG", [])
    for i, command in enumerate(("out", "in")):
        base = [c[i] for c in r.baseline if c[i].ok]
        mine = [c[i] for c in ours if c[i].ok]
        b_wall = median([m.proc.wall for m in base])
        m_wall = median([m.proc.wall for m in mine])
        b_lat = median([x for m in base if (x := m.latency) is not None])
        m_lat = median([x for m in mine if (x := m.latency) is not None])
        b_calls = median([len(m.calls) for m in base])
        m_calls = median([len(m.calls) for m in mine])
        rows.append(
            [
                command,
                f"{len(base)}/{len(r.baseline)}",
                secs(b_wall, 1),
                secs(m_wall, 1),
                ratio(m_wall, b_wall),
                secs(b_lat),
                secs(m_lat),
                ratio(m_lat, b_lat),
                fmt_num(b_calls or 0),
                fmt_num(m_calls or 0),
            ]
        )
    return "\n".join(
        [
            "## 5. Baseline: the aws CLI",
            "",
            "Same local AWS, same group shape (1 target group) and delays, same run. Baseline `out` = "
            "`aws autoscaling enter-standby --should-decrement-desired-capacity` then "
            "`aws elbv2 wait target-deregistered`; `in` = `aws autoscaling exit-standby` then "
            "`aws elbv2 wait target-in-service` (awscli from PyPI, run as `python -m awscli`; its "
            "waiters poll every 15 s). The baseline checks less: no gates, no MinSize guard, no wait for "
            "Standby, one target group only. Ratios are balanced / baseline.",
            "",
            table(
                [
                    "command",
                    "baseline ok",
                    "baseline wall s",
                    "balanced wall s",
                    "wall ratio",
                    "baseline latency s",
                    "balanced latency s",
                    "latency ratio",
                    "baseline calls",
                    "balanced calls",
                ],
                rows,
            ),
        ]
    )


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def report(r: Results, command: str) -> str:
    errors = "".join(f"\n- {e}" for e in r.errors)
    try:
        text = full_report(r, command)
    except Exception as e:  # noqa: BLE001 - show what failed rather than nothing
        text = f"# balanced.py benchmark\n\nCommand: `{command}`\n\nReport failed: {type(e).__name__}: {e}"
    return text + (f"\n\n## Errors\n{errors}" if errors else "")


def full_report(r: Results, command: str) -> str:
    lat_text, lat = latency_section(r)
    calls_text, calls = calls_section(r)
    scale_text, scale = scale_section(r)
    start_text, start = startup_section(r)
    asg = calls["asg"]
    lb = calls["lb"]
    gap = calls["gap"]
    assert isinstance(asg, dict) and isinstance(lb, dict) and isinstance(gap, dict)
    targets = [
        ["detection latency, out: median < 1 s", secs(lat.get("out")), verdict((lat.get("out") or 99) < 1)],
        ["detection latency, in: median < 1 s", secs(lat.get("in")), verdict((lat.get("in") or 99) < 1)],
    ]
    for command_ in ("out", "in"):
        targets.append(
            [
                f"while waiting ({command_}): ASG calls on average at most one per 5 s",
                f"one per {asg[command_]:.1f} s (worst group)",
                verdict(asg[command_] >= TARGET_ASG_INTERVAL),
            ]
        )
        targets.append(
            [
                f"while waiting ({command_}): at most one call per second per LB (average)",
                f"{lb[command_]:.2f} calls/s per LB (worst group)",
                verdict(lb[command_] <= TARGET_LB_RATE),
            ]
        )
        targets.append(
            [
                f"while waiting ({command_}): at most one call per second per LB (strict: no gap < 1 s)",
                f"shortest gap {gap[command_]:.2f} s",
                verdict(gap[command_] >= 1 / TARGET_LB_RATE),
            ]
        )
    gate = calls["gate"]
    assert isinstance(gate, int)
    targets += [
        [
            "gate and resolution phase of out, 1 target group: at most 6 calls",
            f"{gate} calls",
            verdict(gate <= TARGET_GATE_CALLS),
        ],
        ["start-up to first API call < 0.3 s (median)", f"{secs(start, 3)} s", verdict((start or 99) < 0.3)],
        ["scale: answers cover the whole group, out/in converge", "see section 3", verdict(scale["checks"])],
        ["scale: calls per poll do not grow with instances", "see section 3", verdict(scale["calls"])],
        ["scale: bytes per poll do not grow with instances", "see section 3", verdict(scale["bytes"])],
    ]
    return "\n\n".join(
        [
            "# balanced.py benchmark",
            f"Command: `{command}` (took {r.elapsed / 60:.1f} min)",
            "\n".join(r.machine),
            "## Targets (defaults: no --poll)\n\n" + table(["target", "measured", "verdict"], targets),
            lat_text,
            calls_text,
            scale_text,
            start_text,
            baseline_section(r),
        ]
    )


###############################################################################
# Main ########################################################################
###############################################################################


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="out+in cycles for the latency runs (default 5; quick 2)")
    parser.add_argument("--quick", action="store_true", help="short delays, fewer runs, 100 instances")
    parser.add_argument("--scale-size", type=int, help="instances in the scale group (default 500)")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    settings = Settings.of(runs=args.runs, quick=args.quick, scale_size=args.scale_size)
    shown = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bench.benchmark", *shown])
    text = report(run_all(settings), command) + "\n"
    sys.stdout.write(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
