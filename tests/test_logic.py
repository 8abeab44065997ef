"""Unit tests of balanced.py's pure decision logic: gates, floors, verdicts, polling, parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

import balanced as b

TG = b.LoadBalancer(
    "tg", "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef"
)
ELB = b.LoadBalancer("elb", "web-classic")


def make_group(
    *,
    serving: int = 3,
    min_size: int = 1,
    desired: int | None = None,
    max_size: int = 10,
    extra: tuple[b.Member, ...] = (),
    suspended: frozenset[str] = frozenset(),
    tags: dict[str, str] | None = None,
) -> b.Group:
    members = tuple(b.Member(f"i-{n:017x}", "InService", "Healthy") for n in range(serving)) + extra
    in_service = sum(1 for m in members if m.lifecycle not in b.STANDBY_STATES)
    return b.Group(
        name="web-asg",
        min_size=min_size,
        max_size=max_size,
        desired=in_service if desired is None else desired,
        members=members,
        suspended=suspended,
        load_balancers=(TG, ELB),
        unsupported_sources=(),
        tags=tags or {},
    )


def healthy_everywhere(group: b.Group, **overrides: b.LbState) -> dict[b.LoadBalancer, dict[str, b.LbState]]:
    tg = {m.instance_id: b.LbState("healthy") for m in group.members if m.lifecycle == "InService"}
    elb = {m.instance_id: b.LbState("InService") for m in group.members if m.lifecycle == "InService"}
    tg.update(overrides)
    return {TG: tg, ELB: elb}


def snapshot(group: b.Group, **kw: object) -> b.Snapshot:
    health = kw.pop("health", None) or healthy_everywhere(group)
    me = group.members[0]
    return b.Snapshot(group=group, me=me, health=health, **kw)  # type: ignore[arg-type]


# Gates -------------------------------------------------------------------------------------------


def test_gates_pass_on_a_healthy_group() -> None:
    assert b.out_refusals(snapshot(make_group()), floor=1) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"activities": ("Launching a new EC2 instance: i-1 (InProgress)",)}, "scaling activity in progress"),
        ({"refresh": "abc (InProgress)"}, "instance refresh in progress"),
    ],
)
def test_gates_refuse_while_the_group_is_busy(change: dict[str, object], reason: str) -> None:
    reasons = b.out_refusals(snapshot(make_group(), **change), floor=1)
    assert len(reasons) == 1 and reason in reasons[0]


@pytest.mark.parametrize("process", ["Launch", "AddToLoadBalancer"])
def test_gates_refuse_when_a_suspended_process_would_block_the_return(process: str) -> None:
    reasons = b.out_refusals(snapshot(make_group(suspended=frozenset({process, "AZRebalance"}))), floor=1)
    assert len(reasons) == 1
    assert f"suspended process {process}" in reasons[0] and "resume-processes" in reasons[0]


def test_gates_ignore_harmless_suspended_processes() -> None:
    assert b.out_refusals(snapshot(make_group(suspended=frozenset({"AZRebalance"}))), floor=1) == []


def test_gates_count_only_others_that_serve_everywhere() -> None:
    group = make_group(serving=3)
    # One peer is InService in the ASG but still 'initial' in the target group: not serving.
    health = healthy_everywhere(group, **{group.members[1].instance_id: b.LbState("initial")})
    reasons = b.out_refusals(snapshot(group, health=health), floor=2)
    assert reasons == ["only 1 other instance(s) serving in web-asg, need 2 (1 of 3 serving, floor 2)"]


def test_gates_refuse_an_unhealthy_asg_peer_and_a_draining_classic_peer() -> None:
    peers = (b.Member("i-00000000000000aa", "InService", "UNHEALTHY"),)
    group = make_group(serving=2, extra=peers)
    health = healthy_everywhere(group)
    health[ELB][group.members[1].instance_id] = b.LbState("draining", "connection draining")
    assert b.serving_instances(group, health) == [group.members[0].instance_id]


def test_gates_refuse_when_this_instance_is_not_in_service() -> None:
    group = make_group()
    me = b.Member(group.members[0].instance_id, "Pending", "Healthy")
    snap = b.Snapshot(group=group, me=me, health=healthy_everywhere(group))
    assert any("Pending, not InService" in r for r in b.out_refusals(snap, floor=1))


def test_gates_refuse_when_min_size_was_changed_by_someone_else_mid_rollout() -> None:
    group = make_group(min_size=4, tags={b.MIN_SIZE_TAG: "original=3 rollout=2"})
    reasons = b.out_refusals(snapshot(group), floor=2)
    assert reasons and "someone changed MinSize" in reasons[0]


def test_gates_refuse_a_second_rollout_with_a_different_floor() -> None:
    out = (b.Member("i-00000000000000aa", "Standby", "Healthy"),)
    group = make_group(serving=4, min_size=2, extra=out, tags={b.MIN_SIZE_TAG: "original=5 rollout=2"})
    reasons = b.out_refusals(snapshot(group), floor=3)
    assert reasons and "different floor" in reasons[0]


def test_in_refuses_when_launch_is_suspended_or_max_size_would_break() -> None:
    me = b.Member("i-00000000000000aa", "Standby", "Healthy")
    assert "Launch" in b.in_refusals(make_group(extra=(me,), suspended=frozenset({"Launch"})), me)[0]
    assert "above MaxSize 3" in b.in_refusals(make_group(extra=(me,), max_size=3), me)[0]
    assert b.in_refusals(make_group(extra=(me,)), me) == []


# Floor and the MinSize semaphore -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("full", "n", "p", "floor"),
    [
        (10, 1, 0, 1),
        (10, 1, 75, 8),
        (20, 1, 75, 15),
        (4, 1, 50, 2),
        (3, 5, 0, 5),
        (1, 0, 100, 1),
        (7, 0, 10, 1),
    ],
)
def test_floor_is_the_larger_of_count_and_percent_rounded_up(full: int, n: int, p: float, floor: int) -> None:
    assert b.floor_for(full, min_healthy=n, min_healthy_percent=p) == floor


def test_full_capacity_counts_instances_out_in_standby() -> None:
    out = (b.Member("i-00000000000000aa", "EnteringStandby", "Healthy"),)
    group = make_group(serving=4, extra=out)
    assert (group.desired, group.out_count, group.full_capacity) == (4, 1, 5)


@pytest.mark.parametrize(
    ("min_size", "desired", "floor", "change"),
    [
        (2, 2, 1, True),  # desired == min: EnterStandby would be rejected
        (1, 3, 1, False),  # already the floor
        (2, 5, 1, False),  # operator's MinSize is stricter than the floor and leaves room
        (0, 3, 1, True),  # below the floor: hold it there so AWS enforces the floor
    ],
)
def test_min_size_changes_only_when_needed(min_size: int, desired: int, floor: int, change: bool) -> None:
    group = make_group(serving=desired, min_size=min_size)
    assert b.must_hold_min_size(group, floor=floor) is change


def test_a_recorded_rollout_is_always_held_again_since_reads_go_stale() -> None:
    group = make_group(serving=5, min_size=2, tags={b.MIN_SIZE_TAG: "original=2 rollout=2"})
    assert b.must_hold_min_size(group, floor=2)


def test_min_size_tag_round_trips_and_rejects_garbage() -> None:
    record = b.MinSizeRecord(original=20, rollout=15)
    assert b.parse_min_size_tag(record.to_tag()) == record
    assert b.parse_min_size_tag(None) is None
    with pytest.raises(b.BalancedError, match="not 'original=N rollout=M'"):
        b.parse_min_size_tag("twenty")


# Verdicts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifecycle", "tg", "status"),
    [
        ("EnteringStandby", b.LbState("draining", "Target.DeregistrationInProgress"), b.WAIT),
        ("EnteringStandby", b.LbState("unused", "Target.NotRegistered"), b.WAIT),
        ("Standby", b.LbState("draining"), b.WAIT),
        ("Standby", b.LbState("unused", "Target.NotRegistered"), b.DONE),
        ("Standby", b.LbState("unused", "InvalidTarget"), b.DONE),
        ("InService", b.LbState("unused"), b.FAILED),
        (None, b.LbState("unused"), b.FAILED),
    ],
)
def test_out_verdict(lifecycle: str | None, tg: b.LbState, status: str) -> None:
    states = {TG: tg, ELB: b.LbState("OutOfService", "not registered")}
    assert b.out_verdict(lifecycle, states, "i-1").status == status


def test_out_verdict_waits_for_classic_connection_draining() -> None:
    draining = b.classic_state(
        {"State": "InService", "Description": "Instance deregistration currently in progress."}
    )
    verdict = b.out_verdict("Standby", {TG: b.LbState("unused"), ELB: draining}, "i-1")
    assert verdict.status == b.WAIT and "elb/web-classic draining" in verdict.explanation


@pytest.mark.parametrize(
    ("lifecycle", "tg", "status"),
    [
        ("Pending", b.LbState("initial", "Elb.RegistrationInProgress"), b.WAIT),
        ("InService", b.LbState("initial", "Elb.InitialHealthChecking"), b.WAIT),
        ("InService", b.LbState("unhealthy", "Target.FailedHealthChecks"), b.WAIT),
        ("Pending", b.LbState("healthy"), b.WAIT),
        ("InService", b.LbState("healthy"), b.DONE),
        ("Terminating", b.LbState("healthy"), b.FAILED),
        (None, b.LbState("healthy"), b.FAILED),
    ],
)
def test_in_verdict(lifecycle: str | None, tg: b.LbState, status: str) -> None:
    assert b.in_verdict(lifecycle, {TG: tg, ELB: b.LbState("InService")}, "i-1").status == status


def test_classic_states_distinguish_unhealthy_from_unregistered() -> None:
    unhealthy = b.classic_state({"State": "OutOfService", "Description": "Instance has failed at least ..."})
    gone = b.classic_state({"State": "OutOfService", "Description": "Instance is not currently registered."})
    assert unhealthy.state == gone.state == "OutOfService"
    assert gone.reason == "not registered" and "failed" in unhealthy.reason


def test_lb_names_are_short() -> None:
    assert TG.name == "tg/web" and ELB.name == "elb/web-classic"


# The wait loop (clock and sleep injected: no real time passes) -----------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_waiter(clock: FakeClock, *, timeout: float, poll: float = 1.0) -> b.Waiter:
    return b.Waiter(
        log=b.Log(level=b.QUIET), deadline=clock() + timeout, poll=poll, clock=clock, sleep=clock.sleep
    )


def test_wait_probes_before_sleeping_and_stops_when_done() -> None:
    clock = FakeClock()
    verdicts = iter([b.Verdict(b.WAIT, "a"), b.Verdict(b.WAIT, "a"), b.Verdict(b.DONE, "ok")])
    result = make_waiter(clock, timeout=60).wait(lambda: next(verdicts), what="x")
    assert result.status == b.DONE and len(clock.sleeps) == 2


def test_wait_times_out_with_the_last_state_seen() -> None:
    clock = FakeClock()
    states = iter(f"tg/web draining {n}" for n in range(1000))
    with pytest.raises(b.TimedOut, match=r"last seen: tg/web draining \d+$"):
        make_waiter(clock, timeout=10).wait(lambda: b.Verdict(b.WAIT, next(states)), what="x")
    assert clock.now - 1000.0 <= 10.01


def test_wait_returns_failures_immediately() -> None:
    clock = FakeClock()
    result = make_waiter(clock, timeout=10).wait(lambda: b.Verdict(b.FAILED, "gone"), what="x")
    assert result.status == b.FAILED and clock.sleeps == []


@pytest.mark.parametrize(
    ("elapsed", "expected", "poll", "delay"),
    [(0, 300, 1, 5), (280, 300, 1, 5), (297, 300, 1, 1), (400, 300, 1, 1), (0, 0, 1, 1), (0, 2, 0.2, 0.5)],
)
def test_poll_is_slow_far_from_the_expected_end_and_fast_near_it(
    elapsed: float, expected: float, poll: float, delay: float
) -> None:
    assert b.next_poll_delay(elapsed=elapsed, expected=expected, poll=poll) == pytest.approx(delay)


# Command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["sideways"],
        ["out", "--timeout", "-1"],
        ["out", "--timeout", "soon"],
        ["out", "--timeout", "nan"],
        ["out", "--poll", "0"],
        ["out", "--min-healthy", "-2"],
        ["out", "--min-healthy", "two"],
        ["out", "--min-healthy-percent", "150"],
        ["out", "--instance-id", "web-1"],
        ["out", "--region", "moon-base-one"],
        ["in", "--min-healthy", "1"],
    ],
)
def test_bad_arguments_exit_2_with_a_usage_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        b.main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "usage: balanced" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "not a url"}, "not an http(s) URL"),
        ({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:99999/"}, "bad port"),
        ({"AWS_EC2_METADATA_DISABLED": "true"}, "pass --instance-id and --region"),
        ({"AWS_REGION": "moon-1"}, "does not look like an AWS region"),
    ],
)
def test_bad_environment_is_an_environment_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(b.NoEnvironment, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
        b.resolve_identity(instance_id=None, region=None, environ=env)


def test_summary_line_names_instance_outcome_code_and_next_step() -> None:
    line = b.summary_line(
        "out", "REFUSED", b.EXIT_REFUSED, None, "only 0 other instance(s) serving", 1.5, None
    )
    assert line.startswith("balanced: out: REFUSED (3) ")
    assert line.endswith("nothing changed; safe to retry later [1.5s]")


# Yielding after a race -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deficit", "expected"),
    [(0, []), (-2, []), (1, ["i-c"]), (2, ["i-b", "i-c"]), (9, ["i-b", "i-c"])],
)
def test_exactly_the_latest_entrants_yield(deficit: int, expected: list[str]) -> None:
    assert b.yielders(["i-a", "i-b", "i-c"], deficit=deficit) == expected


def test_a_lone_entrant_never_yields() -> None:
    assert b.yielders(["i-a"], deficit=1) == []


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (["healthy", "initial"], "initial"),
        (["unused", "healthy"], "healthy"),
        (["unused", "draining"], "draining"),
        (["unused", "unused"], "unused"),
    ],
)
def test_an_instance_on_several_ports_counts_by_its_worst_port(states: list[str], expected: str) -> None:
    result = None
    for state in states:
        result = b.worse(result, b.LbState(state))
    assert result is not None and result.state == expected


@pytest.mark.parametrize(
    ("lifecycle", "actions", "attempting", "advice"),
    [
        ("EnteringStandby", ["EnterStandby"], "", "left EnteringStandby; rerun 'balanced.py out'"),
        (
            "InService",
            ["EnterStandby"],
            "EnterStandby",
            "EnterStandby was requested and may have been applied",
        ),
        ("InService", ["EnterStandby", "ExitStandby"], "", "left InService; rerun 'balanced.py in'"),
        ("Pending", ["ExitStandby"], "", "left Pending; rerun 'balanced.py in'"),
    ],
)
def test_a_failure_after_an_action_says_where_the_instance_was_left(
    lifecycle: str, actions: list[str], attempting: str, advice: str
) -> None:
    ctx = b.Context(clients=None, instance_id="i-1", log=b.Log(), waiter=None)  # type: ignore[arg-type]
    ctx.lifecycle, ctx.actions, ctx.attempting = lifecycle, actions, attempting
    ctx.phase = "in" if "ExitStandby" in actions else "out"
    assert advice in b.next_step(b.EXIT_ENVIRONMENT, ctx, b.NoEnvironment("credentials expired"))


def test_a_yield_says_the_instance_is_back() -> None:
    ctx = b.Context(clients=None, instance_id="i-1", log=b.Log(), waiter=None)  # type: ignore[arg-type]
    ctx.lifecycle, ctx.actions, ctx.yielded = "InService", ["EnterStandby", "ExitStandby"], True
    assert "yielded its slot and is InService again" in b.next_step(b.EXIT_REFUSED, ctx, b.Refused("x"))


def test_ci_runs_the_test_command_written_in_the_readme() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    command = readme.split("## Run the tests", 1)[1].split("\n\n", 2)[1].strip()
    assert command == "python -m pytest -q"
    assert command in (root / ".ci" / "run").read_text().splitlines()
