"""Faults, bad input and least privilege: balanced.py keeps its promises when AWS, the network
or the operator misbehave. Every test runs the real script as a subprocess."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import FaultProxy, Faults
from tests.helpers import SCRIPT, Run, balanced, mutations

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def env(aws: Any, imds: Any) -> dict[str, str]:
    return aws.env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint, AWS_REGION=None)


def assert_outcome(run: Run, code: int, *fragments: str) -> None:
    assert run.code == code, run
    assert run.summary.startswith("balanced: "), run
    assert "Traceback" not in run.stderr + run.stdout, run
    for fragment in fragments:
        assert fragment in run.summary, run


# AWS misbehaves: throttling, 5xx, slow answers, dropped connections ----------------------------------


def test_out_and_in_converge_through_throttling_5xx_slow_answers_and_drops(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1, classic_elbs=1)
    imds.instance_id = group.instance_ids[0]
    faults = Faults(throttle=0.30, error_500=0.03, error_503=0.03, drop=0.03, slow=0.05, slow_seconds=0.3)
    with FaultProxy(aws.endpoint, faults) as proxy:
        bad_day = dict(env, AWS_ENDPOINT_URL=proxy.endpoint)
        out = balanced("out", "--timeout", "60", env=bad_day)
        assert_outcome(out, 0)
        assert aws.lifecycle(group.instance_ids[0]) == "Standby"
        back = balanced("in", "--timeout", "60", env=bad_day)
        assert_outcome(back, 0)
        assert aws.lifecycle(group.instance_ids[0]) == "InService"
    print(proxy.tally)
    assert proxy.tally.injected.get("throttle", 0) >= 2  # the weather was real
    assert sum(proxy.tally.injected.values()) >= 4
    assert mutations(aws) == ["EnterStandby", "ExitStandby"]  # retries never doubled an action


def test_total_failure_before_any_action_exits_1_with_the_reason(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1)
    imds.instance_id = group.instance_ids[0]
    with FaultProxy(aws.endpoint, Faults(fail_everything=True)) as proxy:
        run = balanced("out", "--timeout", "6", env=dict(env, AWS_ENDPOINT_URL=proxy.endpoint), timeout=60)
    assert_outcome(run, 1, "ServiceUnavailable", "nothing was changed")
    assert mutations(aws) == []


def test_total_failure_after_enter_standby_exits_4_and_says_where_it_left_the_instance(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1, deregistration_delay=2)
    imds.instance_id = group.instance_ids[0]
    with FaultProxy(aws.endpoint, Faults(fail_after_action="EnterStandby")) as proxy:
        run = balanced("out", "--timeout", "6", env=dict(env, AWS_ENDPOINT_URL=proxy.endpoint), timeout=60)
    assert_outcome(run, 4, "ServiceUnavailable", "left EnteringStandby", "rerun 'balanced.py out'")
    assert mutations(aws) == ["EnterStandby"]


def test_a_hung_aws_call_cannot_outlive_the_timeout(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=1)
    imds.instance_id = group.instance_ids[0]
    with FaultProxy(aws.endpoint, Faults(slow=1.0, slow_seconds=25)) as proxy:
        run = balanced("out", "--timeout", "2", env=dict(env, AWS_ENDPOINT_URL=proxy.endpoint), timeout=20)
    assert_outcome(run, 1, "--timeout reached while waiting for autoscaling:DescribeAutoScalingInstances")


def test_a_signal_during_a_slow_aws_call_is_not_swallowed_by_botocore(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1)
    imds.instance_id = group.instance_ids[0]
    with FaultProxy(aws.endpoint, Faults(slow=1.0, slow_seconds=25)) as proxy:
        argv = [sys.executable, str(SCRIPT), "status", "--timeout", "120"]
        proc = subprocess.Popen(
            argv, env=dict(env, AWS_ENDPOINT_URL=proxy.endpoint), stderr=subprocess.PIPE, text=True
        )
        wait_for(lambda: len(imds.requests) >= 2, "the metadata lookups")
        time.sleep(0.5)  # now inside the first (hung) AWS call
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert_outcome(Run(proc.returncode, "", stderr), 143, "interrupted by SIGTERM", "nothing was changed")


@pytest.mark.parametrize("action", ["EnterStandby", "ExitStandby"])
def test_a_lost_answer_to_a_standby_move_is_recognised_not_reported_as_failure(
    aws: Any, imds: Any, env: dict[str, str], action: str
) -> None:
    group = aws.make_group(size=3, min_size=1)
    me = group.instance_ids[0]
    imds.instance_id = me
    if action == "ExitStandby":
        assert_outcome(balanced("out", env=env), 0)
    command = "out" if action == "EnterStandby" else "in"
    with FaultProxy(aws.endpoint, Faults(lose_answer_of=action)) as proxy:
        run = balanced(command, env=dict(env, AWS_ENDPOINT_URL=proxy.endpoint))
    assert proxy.tally.injected == {"lost answer": 1}
    # botocore retried; AWS rejected the retry of a move it had made. Still a success:
    assert_outcome(run, 0)
    assert "an earlier attempt went through (its answer was lost)" in run.stderr
    assert aws.lifecycle(me) == ("Standby" if action == "EnterStandby" else "InService")


def test_a_refused_min_size_change_takes_its_record_back(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=2, min_size=2, max_size=2)
    imds.instance_id = group.instance_ids[0]
    aws.fail_next("UpdateAutoScalingGroup", code="AccessDenied", message="not authorized", status=403)
    run = balanced("out", env=env)
    assert_outcome(run, 1, "the instance role needs autoscaling:UpdateAutoScalingGroup")
    assert "balanced:min-size" not in aws.group_tags(group.name)
    assert aws.group_sizes(group.name) == (2, 2, 2) and aws.lifecycle(group.instance_ids[0]) == "InService"


def test_wait_that_runs_out_under_slow_aws_is_refused_not_failed(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1)
    imds.instance_id = group.instance_ids[0]
    aws.start_activity(group.name)  # a gate that never passes
    with FaultProxy(aws.endpoint, Faults(slow=1.0, slow_seconds=0.3)) as proxy:
        slow = dict(env, AWS_ENDPOINT_URL=proxy.endpoint)
        run = balanced("out", "--wait", "--timeout", "6", env=slow, timeout=60)
    assert_outcome(run, 3, "scaling activity in progress", "nothing changed; safe to retry later")
    assert mutations(aws) == []


# The metadata service misbehaves -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "code", "fragment"),
    [
        ("v1", 0, ""),  # IMDSv1 only: works, as botocore does
        ("expire", 0, ""),  # 401 on an expired token: a fresh token, as botocore does
        ("hang", 5, "instance metadata unreachable"),
        ("forbidden", 5, "HTTP 403"),
    ],
)
def test_metadata_service_modes(
    aws: Any, imds: Any, env: dict[str, str], mode: str, code: int, fragment: str
) -> None:
    group = aws.make_group(size=2, min_size=1)
    imds.instance_id = group.instance_ids[0]
    imds.mode = mode
    run = balanced("status", env=env, timeout=30)
    assert_outcome(run, code, fragment)
    if code == 0:
        assert group.instance_ids[0] in run.stdout


def test_metadata_down_is_exit_5(aws: Any) -> None:
    env = aws.env(AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:1/", AWS_REGION=None)
    assert_outcome(balanced("in", env=env, timeout=30), 5, "Connection refused")


# Interrupted: AWS left as it is, the state said, 130/143 ------------------------------------------------


def start(command: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """balanced running in the background, for a test to change AWS under it."""
    argv = [sys.executable, str(SCRIPT), command, "--poll", "0.1", "--timeout", "60"]
    return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_out_leaves_aws_alone_and_says_how_to_finish(
    aws: Any, imds: Any, env: dict[str, str], sig: signal.Signals, code: int
) -> None:
    group = aws.make_group(size=2, min_size=2, max_size=2, deregistration_delay=20)
    me = group.instance_ids[0]
    imds.instance_id = me
    proc = start("out", env)
    wait_for(lambda: aws.lifecycle(me) == "EnteringStandby", "EnteringStandby")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    run = Run(proc.returncode, "", stderr)
    assert_outcome(run, code, "INTERRUPTED", f"{me} left EnteringStandby", "rerun 'balanced.py out'")
    assert aws.lifecycle(me) == "EnteringStandby"
    # The MinSize record was written whole, before the change: `in` can finish the job.
    assert aws.group_tags(group.name)["balanced:min-size"] == "original=2 rollout=1"
    aws.set_deregistration_delay(group.tg_arns[0], 0.5)
    assert_outcome(balanced("in", env=env), 0)
    assert aws.group_sizes(group.name) == (2, 2, 2)
    assert "balanced:min-size" not in aws.group_tags(group.name)


def test_a_reboot_between_out_and_in_loses_nothing(aws: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=2, min_size=2, max_size=2)
    me = group.instance_ids[0]
    from tests.imds import FakeIMDS

    with FakeIMDS(instance_id=me) as before:
        assert_outcome(balanced("out", env=dict(env, AWS_EC2_METADATA_SERVICE_ENDPOINT=before.endpoint)), 0)
    # A reboot: a new metadata token, no process, no local files; only AWS remembers.
    with FakeIMDS(instance_id=me) as after:
        rebooted = dict(env, AWS_EC2_METADATA_SERVICE_ENDPOINT=after.endpoint)
        assert_outcome(balanced("in", env=rebooted), 0)
        assert_outcome(balanced("in", env=rebooted), 0)
    assert aws.group_sizes(group.name) == (2, 2, 2)
    updates = [c.params.get("MinSize") for c in aws.calls_of("UpdateAutoScalingGroup") if c.ok]
    assert updates == ["1", "2"]  # lowered once, restored exactly once


# The group changes under the tool -------------------------------------------------------------------


def test_instance_terminated_while_draining_fails_fast_and_gives_min_size_back(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=2, min_size=2, max_size=2, deregistration_delay=30)
    me = group.instance_ids[0]
    imds.instance_id = me
    proc = start("out", env)
    wait_for(lambda: aws.lifecycle(me) == "EnteringStandby", "EnteringStandby")
    aws.clear_calls()
    aws.terminate(me)
    _, stderr = proc.communicate(timeout=30)  # long before the 60 s timeout or the 30 s drain
    assert_outcome(Run(proc.returncode, "", stderr), 1, "left its Auto Scaling group", "the instance is gone")
    # Seen at once from the target's Target.InvalidState, not at the next 10-poll heartbeat:
    polls_after = [c for c in aws.calls_of("DescribeTargetHealth") if "Targets.member.1.Id" in c.params]
    assert len(polls_after) < 5
    # It can never run `in`: the MinSize it lowered is restored now, and the record removed.
    assert aws.group_sizes(group.name)[0] == 2
    assert "balanced:min-size" not in aws.group_tags(group.name)


def test_instance_terminated_while_coming_back_fails_fast(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=1, health_seconds=30)
    me = group.instance_ids[0]
    imds.instance_id = me
    assert_outcome(balanced("out", env=env), 0)
    proc = start("in", env)
    wait_for(lambda: aws.lifecycle(me) in ("Pending", "InService"), "Pending")
    aws.terminate(me)
    _, stderr = proc.communicate(timeout=40)
    assert_outcome(Run(proc.returncode, "", stderr), 1, "left its Auto Scaling group")


def test_someone_putting_the_instance_back_in_standby_ends_in_with_a_clear_failure(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1, health_seconds=30)
    me = group.instance_ids[0]
    imds.instance_id = me
    assert_outcome(balanced("out", env=env), 0)
    proc = start("in", env)
    wait_for(lambda: aws.lifecycle(me) in ("Pending", "InService"), "Pending")
    aws.set_lifecycle(me, "Standby")
    _, stderr = proc.communicate(timeout=40)  # long before the 30 s health checks or the timeout
    run = Run(proc.returncode, "", stderr)
    assert_outcome(run, 1, f"{me} is Standby again: someone put it back out")
    assert "(confirming)" in stderr  # believed on the second read, not the first


def test_target_group_detached_while_coming_back_is_no_longer_waited_for(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1, target_groups=2, health_seconds=1)
    me = group.instance_ids[0]
    imds.instance_id = me
    assert_outcome(balanced("out", env=env), 0)
    aws.set_target_health(me, "unhealthy")  # would never pass in either target group
    proc = start("in", env)
    wait_for(lambda: aws.lifecycle(me) in ("Pending", "InService"), "Pending")
    time.sleep(1.0)  # let `in` read the group (with both target groups) and start waiting
    for arn in group.tg_arns:
        aws.detach_target_group(group.name, arn)
    _, stderr = proc.communicate(timeout=40)
    run = Run(proc.returncode, "", stderr)
    assert_outcome(run, 0)
    assert f"tg/{group.tg_names[0]} was detached from {group.name}; no longer waiting for it" in stderr


def test_target_group_deleted_while_coming_back_is_a_clear_failure(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1, health_seconds=30)
    me = group.instance_ids[0]
    imds.instance_id = me
    assert_outcome(balanced("out", env=env), 0)
    aws.delete_target_group(group.tg_arns[0])  # the group still lists it
    run = balanced("in", "--timeout", "60", env=env)
    assert_outcome(run, 1, f"tg/{group.tg_names[0]} no longer exists", "can never become healthy")


# Credentials and permissions ----------------------------------------------------------------------------


def test_missing_credentials_are_an_environment_error(aws: Any, imds: Any) -> None:
    group = aws.make_group(size=2)
    imds.instance_id = group.instance_ids[0]
    env = aws.env(
        AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None
    )
    assert_outcome(balanced("out", env=env), 5, "no AWS credentials")


def test_credentials_expiring_mid_drain_still_say_where_the_instance_was_left(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1, deregistration_delay=2)
    imds.instance_id = group.instance_ids[0]
    expire = Faults(fail_after_action="EnterStandby", tripped_code="ExpiredToken", tripped_status=403)
    with FaultProxy(aws.endpoint, expire) as proxy:
        run = balanced("out", env=dict(env, AWS_ENDPOINT_URL=proxy.endpoint))
    assert_outcome(run, 5, "AWS rejected the credentials", "left EnteringStandby", "rerun 'balanced.py out'")


def test_expired_credentials_are_an_environment_error(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=2)
    imds.instance_id = group.instance_ids[0]
    aws.fail_next("DescribeAutoScalingInstances", code="ExpiredToken", message="token expired", status=403)
    assert_outcome(balanced("out", env=env), 5, "AWS rejected the credentials", "ExpiredToken")


def test_access_denied_names_the_missing_iam_action(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=1)
    imds.instance_id = group.instance_ids[0]
    aws.fail_next("EnterStandby", code="AccessDenied", message="not authorized", status=403)
    run = balanced("out", env=env)
    assert_outcome(run, 1, "the instance role needs autoscaling:EnterStandby")
    assert mutations(aws) == []


def test_no_credentials_or_tokens_in_any_log_line(aws: Any, imds: Any) -> None:
    group = aws.make_group(size=2, min_size=2, max_size=2)
    imds.instance_id = group.instance_ids[0]
    secret, session = "S3cr3tKeyThatMustNeverBeLogged/xyz", "SessionTokenThatMustNeverBeLogged"
    env = aws.env(
        AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_SESSION_TOKEN=session,
        AWS_ACCESS_KEY_ID="AKIAEXAMPLEKEYID0000",
    )
    output = ""
    for command in ("status", "out", "in"):
        run = balanced(command, "-v", "--json", env=env)
        assert run.code == 0, run
        output += run.stdout + run.stderr
    assert imds.issued_tokens
    for leak in [secret, session, "AKIAEXAMPLEKEYID0000", *imds.issued_tokens]:
        assert leak not in output


# Bad input: one line, the documented code, never a traceback -----------------------------------------


BAD_INPUT = [
    (["out", "--timeout", "-10"], {}, 2, "must be between 0 and 86400 seconds"),
    (["out", "--timeout", "99999999"], {}, 2, "must be between 0 and 86400 seconds"),
    (["out", "--timeout", "ten"], {}, 2, "not a number of seconds"),
    (["in", "--poll", "0"], {}, 2, "must be between 0.05 and 60 seconds"),
    (["out", "--min-healthy", "1.5"], {}, 2, "not a whole number"),
    (["out", "--min-healthy-percent", "-1"], {}, 2, "must be between 0 and 100"),
    (["deploy"], {}, 2, "invalid choice: 'deploy'"),
    ([], {}, 2, "the following arguments are required"),
    (["out", "--instance-id", "web01"], {}, 2, "not an EC2 instance id"),
    (["out", "--region", "Mars"], {}, 2, "not an AWS region"),
    (["run", "--"], {}, 2, "run needs a command"),
    (["out"], {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "169.254.169.254"}, 5, "not an http(s) URL"),
    (["out"], {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://[::1"}, 5, "not an http(s) URL"),
    (["out"], {"AWS_REGION": "not a region"}, 5, "does not look like an AWS region"),
    (["out"], {"AWS_MAX_ATTEMPTS": "many"}, 5, "AWS_MAX_ATTEMPTS='many'"),
    (["out"], {"AWS_RETRY_MODE": "eventually"}, 5, "AWS_RETRY_MODE='eventually'"),
    (["out", "--min-healthy", "40"], {}, 3, "can never be met"),
]


@pytest.mark.parametrize(("args", "extra_env", "code", "message"), BAD_INPUT)
def test_bad_input(
    aws: Any, imds: Any, args: list[str], extra_env: dict[str, str], code: int, message: str
) -> None:
    group = aws.make_group(size=3, min_size=1)
    imds.instance_id = group.instance_ids[0]
    env = aws.env(**{"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.endpoint, **extra_env})
    run = balanced(*args, env=env, fast=False, timeout=30)
    assert run.code == code, run
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert message in last, run
    assert mutations(aws) == []


def test_unknown_region_fails_within_the_timeout_naming_the_endpoint(aws: Any, imds: Any) -> None:
    group = aws.make_group(size=2)
    imds.instance_id = group.instance_ids[0]
    env = aws.env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint, AWS_ENDPOINT_URL=None)
    run = balanced("out", "--region", "xx-nowhere-9", "--timeout", "5", env=env, timeout=60)
    assert_outcome(run, 1, "xx-nowhere-9")


# Least privilege: README's policy is exactly what the code calls -----------------------------------------


def documented_policy() -> set[str]:
    text = README.read_text()
    block = re.search(r"<!-- iam-policy -->\s*```json\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- iam-policy --> JSON block"
    policy = json.loads(block.group(1))
    return {
        a
        for stmt in policy["Statement"]
        for a in ([stmt["Action"]] if isinstance(stmt["Action"], str) else stmt["Action"])
    }


@pytest.fixture
def every_operation(aws: Any, imds: Any, env: dict[str, str]) -> Iterator[set[str]]:
    """Every API operation balanced.py makes in one full life: status, out with MinSize held,
    in with MinSize restored, plus those the other end-to-end tests recorded in this session."""
    group = aws.make_group(size=2, min_size=2, max_size=2, classic_elbs=1)
    imds.instance_id = group.instance_ids[0]
    for command in ("status", "out", "in"):
        assert balanced(command, env=env).code == 0
    yield aws.session_operations


def test_readme_iam_policy_lists_exactly_the_operations_the_code_calls(every_operation: set[str]) -> None:
    documented = documented_policy()
    assert every_operation - documented == set(), "called but missing from README's policy"
    assert documented - every_operation == set(), "in README's policy but never called"
