"""Try balanced.py without AWS: a local AWS, a small fleet, and a rolling deployment through it.

    python -m tests.sandbox [--size N] [--parallel K] [--min-healthy-percent P] [--keep] [--fast]

Starts the local AWS of the tests (moto's server, extended to drain and health-check like AWS) with
one Auto Scaling group behind an ALB target group and a classic ELB, gives every instance its own
fake instance metadata service (IMDSv2), and then does what `knife ssh` would do: on each host, one
instance at a time (or K at a time), the shell command

    python balanced.py out && <deploy> && python balanced.py in

streaming every line the host prints, prefixed with the host. Between hosts it shows the fleet as
AWS sees it; at the end it checks that every instance is back InService and healthy, and that the
group's MinSize is the operator's again. Exit 0 when all of that holds, 1 otherwise, 130 on Ctrl-C.
Nothing here talks to real AWS.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

from tests.imds import FakeIMDS
from tests.localaws import REGION, Group, LocalAWS

SCRIPT = Path(__file__).resolve().parent.parent / "balanced.py"
GROUP_NAME = "web-asg"
MIN_SIZE_TAG = "balanced:min-size"
EXIT_INTERRUPTED = 130
# How long interrupted hosts get to finish (balanced may still restore MinSize), before SIGKILL.
GRACE_SECONDS = 10.0
HOST_COLORS = ("36", "33", "35", "32", "34", "31")  # ANSI: cyan, yellow, magenta, green, blue, red


@dataclass(frozen=True)
class Pace:
    """How slow the simulated AWS is, and how balanced is told to poll it."""

    deregistration_delay: float  # target group
    connection_draining: float  # classic ELB
    health_seconds: float  # until a returning instance passes the health checks
    pending_seconds: float  # ExitStandby: Pending -> InService
    deploy_seconds: float
    balanced_flags: tuple[str, ...] = ()


REAL_ISH = Pace(3.0, 2.0, 2.0, 0.5, 1.0)
FAST = Pace(0.4, 0.3, 0.3, 0.1, 0.1, ("--poll", "0.1", "--timeout", "60"))


@dataclass(frozen=True)
class Options:
    size: int
    parallel: int
    min_healthy_percent: float | None
    keep: bool
    pace: Pace

    def out_flags(self) -> list[str]:
        flags = list(self.pace.balanced_flags)
        if self.min_healthy_percent is not None:
            flags += ["--min-healthy-percent", f"{self.min_healthy_percent:g}"]
        if self.parallel > 1:
            flags.append("--wait")  # another host may hold the last free slot: wait for it
        return flags

    def chain(self, host: str, *, python: str = "python", script: str = "balanced.py") -> str:
        """The shell command run on one host: out && deploy && in."""
        out = shlex.join([python, script, "out", *self.out_flags()])
        back = shlex.join([python, script, "in", *self.pace.balanced_flags])
        deploy = f"sleep {self.pace.deploy_seconds:g} && echo deployed v2 on {host}"
        return f"{out} && {deploy} && {back}"


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.sandbox",
        description="Roll a simulated deployment through a local, fake AWS fleet with balanced.py.",
    )
    parser.add_argument("--size", type=int, default=4, help="instances in the group (default %(default)s)")
    parser.add_argument(
        "--parallel", type=int, default=1, metavar="K", help="hosts rolled at a time (default %(default)s)"
    )
    parser.add_argument(
        "--min-healthy-percent",
        type=float,
        metavar="P",
        help="passed to 'balanced.py out': keep at least P%% of the group serving",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the local AWS running at the end, until Ctrl-C"
    )
    parser.add_argument("--fast", action="store_true", help="sub-second drains and health checks")
    args = parser.parse_args(argv)
    if not 2 <= args.size <= 20:
        parser.error("--size must be between 2 and 20")
    if not 1 <= args.parallel <= args.size:
        parser.error(f"--parallel must be between 1 and --size ({args.size})")
    percent = args.min_healthy_percent
    if percent is not None:
        if not 0 <= percent <= 100:
            parser.error("--min-healthy-percent must be between 0 and 100")
        floor = max(1, math.ceil(args.size * percent / 100 - 1e-9))  # balanced's floor
        if floor > args.size - 1:
            parser.error(f"--min-healthy-percent {percent:g} keeps all {args.size} serving: none can go out")
    return Options(args.size, args.parallel, percent, args.keep, FAST if args.fast else REAL_ISH)


###############################################################################
# Output ######################################################################
###############################################################################


class Printer:
    """Whole lines on stdout from many threads; host lines prefixed like knife ssh's."""

    def __init__(self, stream: IO[str] = sys.stdout) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.width = 0
        self.colors: dict[str, str] = {}
        self.color = stream.isatty() and "NO_COLOR" not in os.environ

    def set_hosts(self, hosts: Sequence[str]) -> None:
        self.width = max((len(h) for h in hosts), default=0)
        self.colors = {h: HOST_COLORS[i % len(HOST_COLORS)] for i, h in enumerate(hosts)}

    def say(self, text: str = "") -> None:
        with self.lock:
            print(text, file=self.stream, flush=True)

    def host(self, host: str, line: str) -> None:
        label = host.ljust(self.width)
        if self.color:
            label = f"\033[{self.colors.get(host, '1')}m{label}\033[0m"
        self.say(f"{label}  {line}")


def lb_view(aws: LocalAWS, group: Group, instance_id: str, serving: bool) -> str:
    """'healthy' when serving everywhere, else each load balancer's own word for the instance."""
    if serving:
        return "healthy"
    states = [aws.target_state(instance_id, arn) for arn in group.tg_arns]
    states += [aws.elb_state(instance_id, name)[0] for name in group.elb_names]
    return "/".join(dict.fromkeys(states))


def fleet_line(aws: LocalAWS, group: Group) -> str:
    min_size, desired, max_size = aws.group_sizes(group.name)
    members = aws.fleet_snapshot(group.name)
    serving = sum(m.serving for m in members.values())
    instances = ", ".join(
        f"{iid} {m.lifecycle}/{lb_view(aws, group, iid, m.serving)}"
        for iid in group.instance_ids
        if (m := members.get(iid)) is not None
    )
    return (
        f"fleet: {serving}/{len(group.instance_ids)} serving, "
        f"min {min_size} desired {desired} max {max_size} | {instances}"
    )


def exports(aws: LocalAWS) -> list[str]:
    """The shell lines that point balanced.py (or the aws CLI) at this local AWS."""
    env = {k: v for k, v in aws.env().items() if k.startswith("AWS_")}
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    stale = sorted(k for k in os.environ if k.startswith("AWS_") and k not in env)
    if stale:
        lines.insert(0, "unset " + " ".join(stale))
    return lines


def intro(printer: Printer, aws: LocalAWS, group: Group, imds: dict[str, FakeIMDS], opts: Options) -> None:
    pace = opts.pace
    min_size, desired, max_size = aws.group_sizes(group.name)
    say = printer.say
    say("balanced sandbox: a local AWS (moto, extended to drain and health-check like AWS); no real AWS.")
    say(
        f"  Auto Scaling group {group.name}: {len(group.instance_ids)} instances, min {min_size} "
        f"desired {desired} max {max_size}"
    )
    if min_size == desired:
        say("    (min = desired: AWS refuses EnterStandby there, so balanced lowers MinSize and restores it)")
    for name in group.tg_names:
        say(f"  ALB target group {name}: deregistration delay {pace.deregistration_delay:g}s")
    for name in group.elb_names:
        say(f"  classic ELB {name}: connection draining {pace.connection_draining:g}s")
    say(f"  returning instances pass the health checks after {pace.health_seconds:g}s")
    say("  each instance has its own fake metadata service (IMDSv2), so balanced finds itself, e.g.")
    first = group.instance_ids[0]
    say(f"    {first}: AWS_EC2_METADATA_SERVICE_ENDPOINT={imds[first].endpoint}")
    how = "one host at a time" if opts.parallel == 1 else f"{opts.parallel} hosts at a time"
    say(f"Rolling a deployment, {how}, running on every host (like knife ssh):")
    say(f"  {opts.chain('<host>')}")
    say()
    say("To look for yourself, in another terminal while this runs (--keep keeps it up at the end):")
    for line in exports(aws):
        say(f"  {line}")
    say(f"  python balanced.py status --instance-id {first} --region {REGION}")
    say()


###############################################################################
# The roll ####################################################################
###############################################################################


@dataclass
class Monitor:
    """Samples the fleet every few milliseconds: the most out at once, the fewest serving."""

    aws: LocalAWS
    group: str
    max_out: int = 0
    min_serving: int = 1 << 30
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            members = self.aws.fleet_snapshot(self.group).values()
            out = sum(m.lifecycle in ("EnteringStandby", "Standby") for m in members)
            self.max_out = max(self.max_out, out)
            self.min_serving = min(self.min_serving, sum(m.serving for m in members))
            self.stop.wait(0.02)


class Roll:
    """Runs the chain on every host, `parallel` at a time; stops starting hosts after a failure."""

    def __init__(
        self, aws: LocalAWS, group: Group, imds: dict[str, FakeIMDS], opts: Options, printer: Printer
    ) -> None:
        self.aws, self.group, self.imds, self.opts, self.printer = aws, group, imds, opts, printer
        self.todo: queue.Queue[str] = queue.Queue()
        for instance_id in group.instance_ids:
            self.todo.put(instance_id)
        self.codes: dict[str, int] = {}
        self.running: dict[str, subprocess.Popen[str]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # start no more hosts
        self.interrupted = False
        # Workers still running. Not Thread.join: on Python < 3.13 a join that Ctrl-C interrupted
        # leaves the thread looking finished to every later join.
        self.busy = 0

    def worker(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    host = self.todo.get_nowait()
                except queue.Empty:
                    return
                code = self.run_host(host)
                self.codes[host] = code
                if self.interrupted:
                    return
                if code != 0:
                    self.stopping.set()
                    self.printer.say(f"{host}: {describe_exit(code)}; starting no more hosts")
                self.printer.say(fleet_line(self.aws, self.group))
        finally:
            with self.lock:
                self.busy -= 1

    def run_host(self, host: str) -> int:
        env = self.aws.env(
            AWS_EC2_METADATA_SERVICE_ENDPOINT=self.imds[host].endpoint, AWS_REGION=None, PYTHONUNBUFFERED="1"
        )
        command = self.opts.chain(host, python=shlex.quote(sys.executable), script=shlex.quote(str(SCRIPT)))
        with self.lock:
            if self.interrupted:
                return EXIT_INTERRUPTED
            self.printer.host(host, f"$ {self.opts.chain(host)}")
            # A session of its own: a Ctrl-C in the terminal reaches only the sandbox, which
            # forwards it once to every running host.
            proc = subprocess.Popen(
                ["/bin/sh", "-c", command],
                cwd=SCRIPT.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            self.running[host] = proc
        assert proc.stdout is not None
        for line in proc.stdout:
            self.printer.host(host, line.rstrip("\n"))
        code = proc.wait()
        with self.lock:
            del self.running[host]
        return code

    def run(self) -> None:
        """Returns when every host is done; KeyboardInterrupt propagates (see interrupt)."""
        self.printer.say(fleet_line(self.aws, self.group))
        for i in range(self.opts.parallel):
            with self.lock:
                self.busy += 1
            threading.Thread(target=self.worker, name=f"host-{i}", daemon=True).start()
        self.wait_for_workers(math.inf)

    def wait_for_workers(self, seconds: float) -> bool:
        """True once no worker is left; short sleeps, so Ctrl-C reaches this (main) thread."""
        deadline = time.monotonic() + seconds
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.busy

    def interrupt(self) -> None:
        """Forward SIGINT to every running host, give them GRACE_SECONDS, then kill them."""
        with self.lock:
            self.stopping.set()
            self.interrupted = True
            running = list(self.running.values())
        for proc in running:
            signal_group(proc, signal.SIGINT)
        if self.wait_for_workers(GRACE_SECONDS):
            return
        for proc in running:
            signal_group(proc, signal.SIGKILL)
        self.wait_for_workers(5.0)


def describe_exit(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"


def signal_group(proc: subprocess.Popen[str], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signum)


def verdict(aws: LocalAWS, group: Group, roll: Roll, original_min: int) -> list[str]:
    """Everything that is not as it should be after the roll; empty when all is well."""
    problems = [f"{host} {describe_exit(code)}" for host, code in roll.codes.items() if code != 0]
    missing = [h for h in group.instance_ids if h not in roll.codes]
    if missing:
        problems.append(f"not rolled: {', '.join(missing)}")
    members = aws.fleet_snapshot(group.name)
    problems += [f"{iid} is {m.lifecycle}, not serving" for iid, m in members.items() if not m.serving]
    min_size, desired, _ = aws.group_sizes(group.name)
    if min_size != original_min:
        problems.append(f"MinSize is {min_size}, not the operator's {original_min}")
    if desired != len(group.instance_ids):
        problems.append(f"desired capacity is {desired}, not {len(group.instance_ids)}")
    if MIN_SIZE_TAG in aws.group_tags(group.name):
        problems.append(f"tag {MIN_SIZE_TAG} is still on the group")
    return problems


###############################################################################
# Main ########################################################################
###############################################################################


def raise_interrupt(_signum: int, _frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def sandbox(opts: Options, printer: Printer) -> int:
    started = time.monotonic()
    pace = opts.pace
    with ExitStack() as stack:
        printer.say("starting the local AWS...")
        aws = stack.enter_context(LocalAWS())
        group = aws.make_group(
            name=GROUP_NAME,
            size=opts.size,
            min_size=opts.size,
            max_size=opts.size + 2,
            target_groups=1,
            classic_elbs=1,
            deregistration_delay=pace.deregistration_delay,
            connection_draining=pace.connection_draining,
            health_seconds=pace.health_seconds,
            pending_seconds=pace.pending_seconds,
        )
        imds = {iid: FakeIMDS(instance_id=iid, region=REGION) for iid in group.instance_ids}
        stack.callback(stop_all, imds.values())
        for server in imds.values():
            server.start()
        printer.set_hosts(group.instance_ids)
        original_min = aws.group_sizes(group.name)[0]
        intro(printer, aws, group, imds, opts)

        monitor = Monitor(aws, group.name)
        watcher = threading.Thread(target=monitor.run, name="monitor", daemon=True)
        watcher.start()
        stack.callback(watcher.join)
        stack.callback(monitor.stop.set)
        roll = Roll(aws, group, imds, opts, printer)
        rolled_at = time.monotonic()
        try:
            roll.run()
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
            printer.say("sandbox: interrupted; stopping the hosts (SIGINT) and the local AWS")
            roll.interrupt()
            printer.say(fleet_line(aws, group))
            printer.say(f"sandbox: INTERRUPTED [{time.monotonic() - started:.1f}s]")
            return EXIT_INTERRUPTED
        rolled = time.monotonic() - rolled_at
        monitor.stop.set()
        problems = verdict(aws, group, roll, original_min)
        n = len(group.instance_ids)
        printer.say()
        printer.say(
            f"summary: at most {monitor.max_out} of {n} out at once, never fewer than "
            f"{monitor.min_serving} serving; roll took {rolled:.1f}s"
        )
        total = f"[{time.monotonic() - started:.1f}s]"
        if problems:
            printer.say(f"sandbox: FAILED: {'; '.join(problems)} {total}")
            code = 1
        else:
            lbs = len(group.tg_arns) + len(group.elb_names)
            printer.say(
                f"sandbox: OK: rolled {n} instances out and back in; all InService and healthy in "
                f"{lbs} load balancers, MinSize {original_min} restored {total}"
            )
            code = 0
        if opts.keep:
            keep_running(printer, aws, group, imds)
        return code


def stop_all(servers: Iterable[FakeIMDS]) -> None:
    """Stop the metadata services together: each takes up to half a second to notice."""
    threads = [threading.Thread(target=server.stop) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def keep_running(printer: Printer, aws: LocalAWS, group: Group, imds: dict[str, FakeIMDS]) -> None:
    printer.say()
    printer.say("The local AWS keeps running (Ctrl-C to stop). In another terminal:")
    for line in exports(aws):
        printer.say(f"  {line}")
    first = group.instance_ids[0]
    printer.say(f"  python balanced.py status --instance-id {first} --region {REGION}")
    printer.say(f"  python balanced.py out --instance-id {first} --region {REGION}")
    printer.say(f"  AWS_EC2_METADATA_SERVICE_ENDPOINT={imds[first].endpoint} python balanced.py in")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        printer.say("sandbox: stopping the local AWS")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    printer = Printer()
    # Also when started with SIGINT ignored (a background job of a script): kill -INT works.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return sandbox(opts, printer)
    except KeyboardInterrupt:  # during start-up or shut-down
        printer.say("sandbox: interrupted")
        return EXIT_INTERRUPTED
    finally:
        # Everything is stopped: spare the interpreter's final sweep of moto's state (seconds).
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
