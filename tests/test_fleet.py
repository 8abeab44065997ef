"""Rolling a fleet in parallel with no coordinator: the disruption budget AWS enforces.

Like `knife ssh -C 8`, eight workers run `out --wait --min-healthy-percent P && deploy && in`
through a group of 20 instances behind a target group, with real (compressed) drain and health
delays. A monitor samples the group atomically throughout and holds the tool to its guarantees."""

from __future__ import annotations

import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SCRIPT, balanced, mutations

REGION = "us-east-1"


@dataclass
class Monitor:
    """Samples the group every few milliseconds; records the worst it saw."""

    aws: Any
    group: str
    floor: int
    max_out_seen: int = 0
    samples: int = 0
    below_floor_samples: int = 0
    below_floor_seconds: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            snap = self.aws.fleet_snapshot(self.group)
            now = time.monotonic()
            out = sum(1 for s in snap.values() if s.lifecycle in ("EnteringStandby", "Standby"))
            serving = sum(1 for s in snap.values() if s.serving)
            self.max_out_seen = max(self.max_out_seen, out)
            self.samples += 1
            if serving < self.floor:
                self.below_floor_samples += 1
                self.below_floor_seconds += now - last
            last = now
            time.sleep(0.005)


def chain(instance_id: str, env: dict[str, str], extra: list[str], log: list[str]) -> int:
    """What knife runs on one host: out && deploy && in."""
    common = ["--instance-id", instance_id, "--region", REGION, "--poll", "0.2", "--timeout", "240"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "out", *common, "--wait", *extra],
        env=env,
        capture_output=True,
        text=True,
    )
    log.append(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"{instance_id}: no output")
    if out.returncode != 0:
        return out.returncode
    time.sleep(0.3)  # the deployment
    back = subprocess.run(
        [sys.executable, str(SCRIPT), "in", *common], env=env, capture_output=True, text=True
    )
    log.append(back.stderr.strip().splitlines()[-1] if back.stderr.strip() else f"{instance_id}: no output")
    return back.returncode


def roll(
    aws: Any, group: Any, *, workers: int, extra: list[str], floor: int
) -> tuple[Monitor, dict[str, int]]:
    todo: queue.Queue[str] = queue.Queue()
    for instance_id in group.instance_ids:
        todo.put(instance_id)
    env = aws.env()
    codes: dict[str, int] = {}
    log: list[str] = []

    def worker() -> None:
        while True:
            try:
                instance_id = todo.get_nowait()
            except queue.Empty:
                return
            codes[instance_id] = chain(instance_id, env, extra, log)

    monitor = Monitor(aws, group.name, floor)
    watcher = threading.Thread(target=monitor.run, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    monitor.stop.set()
    watcher.join()
    print("\n".join(log))
    print(
        f"samples {monitor.samples}, max out {monitor.max_out_seen}, "
        f"below floor {monitor.below_floor_samples} samples / {monitor.below_floor_seconds:.2f}s"
    )
    return monitor, codes


def assert_rolled_back_to_normal(aws: Any, group: Any, min_size: int) -> None:
    snap = aws.fleet_snapshot(group.name)
    assert {s.lifecycle for s in snap.values()} == {"InService"}
    assert all(s.serving for s in snap.values())
    assert aws.group_sizes(group.name)[0] == min_size
    assert aws.group_sizes(group.name)[1] == len(group.instance_ids)
    assert "balanced:min-size" not in aws.group_tags(group.name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("min_size", "max_size"),
    [(10, 24), (20, 20)],
    ids=["spare-capacity", "min-equals-desired-equals-max"],
)
def test_eight_concurrent_chains_never_exceed_the_disruption_budget(
    aws: Any, min_size: int, max_size: int
) -> None:
    size, percent = 20, 75
    group = aws.make_group(
        size=size, min_size=min_size, max_size=max_size, deregistration_delay=1.0, health_seconds=0.8
    )
    floor = math.ceil(size * percent / 100)  # 15: at most K = 5 out at any moment
    budget = size - floor
    monitor, codes = roll(aws, group, workers=8, extra=["--min-healthy-percent", str(percent)], floor=floor)

    assert codes == dict.fromkeys(group.instance_ids, 0)
    assert monitor.samples > 100
    assert 1 < monitor.max_out_seen <= budget  # parallel, and strictly within the budget
    assert_rolled_back_to_normal(aws, group, min_size)
    # Every instance went out and came back; a race lost on the re-check shows up as an extra
    # out+in pair (the yield), never as an instance left out.
    entered, exited = instances_of(aws, "EnterStandby"), instances_of(aws, "ExitStandby")
    assert set(exited) == set(group.instance_ids) and sorted(entered) == sorted(exited)
    print(f"yields: {len(entered) - size}")


def instances_of(aws: Any, action: str) -> list[str]:
    return [c.params["InstanceIds.member.1"] for c in aws.calls_of(action) if c.ok]


# run: out, CMD, in ------------------------------------------------------------------------------------


def test_run_takes_out_runs_the_command_and_puts_back(aws: Any) -> None:
    group = aws.make_group(size=3, min_size=1)
    me = group.instance_ids[0]
    marker = Path(f"/tmp/balanced-run-{os.getpid()}")
    script = f"test $(cat /dev/null; echo ok) = ok && echo deployed > {marker}"
    run = balanced("run", "--instance-id", me, "--", "sh", "-c", script, env=aws.env())
    assert run.code == 0, run
    assert marker.read_text() == "deployed\n"
    marker.unlink()
    assert mutations(aws) == ["EnterStandby", "ExitStandby"]
    assert aws.lifecycle(me) == "InService" and aws.target_state(me, group.tg_arns[0]) == "healthy"
    assert run.summary.startswith("balanced: run: OK (0) ")


def test_run_leaves_a_broken_instance_out_with_the_command_exit_code(aws: Any) -> None:
    group = aws.make_group(size=3, min_size=1)
    me = group.instance_ids[0]
    run = balanced("run", "--instance-id", me, "--", "sh", "-c", "exit 7", env=aws.env())
    assert run.code == 7, run
    assert "command exited 7" in run.summary and "stays out (Standby)" in run.summary
    assert mutations(aws) == ["EnterStandby"]
    assert aws.lifecycle(me) == "Standby"


@pytest.mark.parametrize("code", [2, 3, 4, 5])
def test_run_reports_a_failed_command_as_such_whatever_its_exit_code(aws: Any, code: int) -> None:
    group = aws.make_group(size=3, min_size=1)
    me = group.instance_ids[0]
    run = balanced(
        "run", "--instance-id", me, "--json", "--", "sh", "-c", f"echo noise; exit {code}", env=aws.env()
    )
    assert run.code == code, run
    assert run.summary.startswith(f"balanced: run: COMMAND FAILED ({code}) ")
    assert "fix it, then 'balanced.py in'" in run.summary and "nothing changed" not in run.summary
    assert run.json["outcome"] == "COMMAND FAILED"  # stdout is one JSON object: CMD's went to stderr
    assert "noise" in run.stderr


def test_run_forwards_sigterm_to_the_command(aws: Any, tmp_path: Path) -> None:
    group = aws.make_group(size=3, min_size=1)
    me = group.instance_ids[0]
    ready, got = tmp_path / "ready", tmp_path / "got"
    script = f"trap 'echo TERM > {got}; exit 9' TERM; touch {ready}; while true; do sleep 0.05; done"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "run", "--instance-id", me, "--poll", "0.1", "--", "sh", "-c", script],
        env=aws.env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert got.read_text() == "TERM\n"
    assert proc.returncode == 9, stderr
    assert aws.lifecycle(me) == "Standby"  # the command did not finish: the instance stays out


# The re-check after EnterStandby, with a race forced deterministically ------------------------------


def context_for(instance_id: str, group: str) -> Any:
    import balanced

    log = balanced.Log(level=balanced.QUIET)
    ctx = balanced.Context(
        clients=balanced.make_clients(REGION, dict(os.environ)),
        instance_id=instance_id,
        log=log,
        waiter=balanced.Waiter(log=log, deadline=time.monotonic() + 60, poll=0.1),
    )
    ctx.group_name = group
    return ctx


def test_a_race_that_breaks_the_floor_makes_exactly_the_later_entrant_yield(
    aws: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import balanced

    for key, value in aws.env().items():
        monkeypatch.setenv(key, value)
    group = aws.make_group(size=5, min_size=0, deregistration_delay=1.0, health_seconds=0.5)
    first, second, *_, sick = group.instance_ids
    aws.set_target_health(sick, "unhealthy")  # InService in the ASG, serving nowhere
    rule = balanced.FloorRule(min_healthy=3, min_healthy_percent=0)
    ctx = {i: context_for(i, group.name) for i in (first, second)}
    # Both read the same state: 3 others serving each, exactly the floor. Then both act.
    snaps = {i: balanced.take_snapshot(c.clients, i, group.name, gates=True) for i, c in ctx.items()}
    assert all(balanced.out_refusals(s, floor=3) == [] for s in snaps.values())
    for i in (first, second):
        balanced.take_out(ctx[i], snaps[i].group, rule=rule)
        time.sleep(0.02)  # distinct EnterStandby start times
    # Now 2 serve, floor 3: exactly one must give its slot back, and it is the later one.
    assert balanced.keeps_its_slot(ctx[first], rule=rule) is True
    assert balanced.keeps_its_slot(ctx[second], rule=rule) is False
    balanced.yield_slot(ctx[second], expected=1.0)
    assert aws.lifecycle(second) == "InService" and aws.target_state(second, group.tg_arns[0]) == "healthy"
    assert aws.lifecycle(first) in ("EnteringStandby", "Standby")
    assert aws.group_tags(group.name)["balanced:min-size"] == "original=0 rollout=3"  # first is still out
    balanced.finish_out(ctx[first], aws_group(group.name))
    balanced.cmd_in(ctx[first])
    assert aws.group_sizes(group.name)[0] == 0 and "balanced:min-size" not in aws.group_tags(group.name)


def aws_group(name: str) -> Any:
    import balanced

    return balanced.describe_group(balanced.make_clients(REGION, dict(os.environ)), name)
