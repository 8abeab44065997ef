"""balanced.py end to end: a subprocess against the local AWS (moto's server extended to drain,
health-check and validate like AWS) and a strict IMDSv2 server, as knife ssh would run it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import Run, balanced, mutations


@pytest.fixture
def env(aws: Any, imds: Any) -> dict[str, str]:
    # Region from the identity document, as on a real instance without AWS_REGION.
    return aws.env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint, AWS_REGION=None)


def on(imds: Any, instance_id: str) -> None:
    imds.instance_id = instance_id


def assert_summary(run: Run, command: str, outcome: str, code: int) -> None:
    assert run.code == code, run
    assert run.summary.startswith(f"balanced: {command}: {outcome} ({code}) "), run
    assert "Traceback" not in run.stderr, run


# The happy path ----------------------------------------------------------------------------------


def test_out_then_in_waits_for_draining_and_health_in_a_target_group_and_a_classic_elb(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1, target_groups=1, classic_elbs=1, health_seconds=1.0)
    me = group.instance_ids[0]
    on(imds, me)

    out = balanced("out", env=env)
    assert_summary(out, "out", "OK", 0)
    # The tool returned only once AWS said so: no drain is still running behind its back.
    assert aws.lifecycle(me) == "Standby"
    assert aws.target_state(me, group.tg_arns[0]) == "unused"
    assert aws.elb_state(me, group.elb_names[0])[0] == "OutOfService"
    assert "draining" in out.stderr and "waiting:" in out.stderr
    assert aws.group_sizes(group.name) == (1, 2, 5)
    assert mutations(aws).count("EnterStandby") == 1

    aws.clear_calls()
    back = balanced("in", env=env)
    assert_summary(back, "in", "OK", 0)
    assert aws.lifecycle(me) == "InService"
    assert aws.target_state(me, group.tg_arns[0]) == "healthy"
    assert aws.elb_state(me, group.elb_names[0])[0] == "InService"
    assert "health checks" in back.stderr
    assert aws.group_sizes(group.name) == (1, 3, 5)
    assert mutations(aws) == ["ExitStandby"]


def test_out_and_in_print_one_parseable_json_object(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=2, min_size=1)
    on(imds, group.instance_ids[1])
    out = balanced("out", "--json", env=env)
    assert_summary(out, "out", "OK", 0)
    result = out.json
    assert result["outcome"] == "OK" and result["exit_code"] == 0
    assert result["instance_id"] == group.instance_ids[1] and result["group"] == group.name
    assert result["lifecycle_state"] == "Standby"
    assert any("EnterStandby" in a for a in result["actions"])
    back = balanced("in", "--json", env=env)
    assert back.json["lifecycle_state"] == "InService" and back.json["exit_code"] == 0


def test_status_shows_instance_group_and_load_balancers(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, target_groups=2, classic_elbs=1)
    on(imds, group.instance_ids[0])
    run = balanced("status", env=env)
    assert_summary(run, "status", "OK", 0)
    assert group.instance_ids[0] in run.stdout and group.name in run.stdout
    for name in group.tg_names:
        assert f"tg/{name}  healthy" in run.stdout
    assert f"elb/{group.elb_names[0]}  InService" in run.stdout
    assert "out now    allowed" in run.stdout
    assert "peers      2 of 2 others serving" in run.stdout
    assert mutations(aws) == []
    assert sorted(balanced("status", "--json", env=env).json["serving"]) == sorted(group.instance_ids)


def test_status_names_the_peers_that_do_not_serve_and_why(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=4, min_size=1)
    me, standby, sick, fine = group.instance_ids
    on(imds, me)
    aws.client("autoscaling").enter_standby(
        AutoScalingGroupName=group.name, InstanceIds=[standby], ShouldDecrementDesiredCapacity=True
    )
    aws.set_target_health(sick, "unhealthy", "Target.ResponseCodeMismatch")
    run = balanced("status", env=env)
    assert "peers      1 of 3 others serving" in run.stdout
    assert f"peer       {sick}  tg/{group.tg_names[0]} unhealthy (Target.ResponseCodeMismatch)" in run.stdout
    assert f"peer       {standby}  " in run.stdout and "Standby/Healthy" in run.stdout  # Entering or not
    peers = balanced("status", "--json", env=env).json["peers"]
    assert peers[fine] == "serving" and peers[sick].startswith(f"tg/{group.tg_names[0]} unhealthy")


def test_a_traffic_source_it_cannot_check_is_named_not_ignored(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1)
    on(imds, group.instance_ids[0])
    lattice = "arn:aws:vpc-lattice:us-east-1:123456789012:targetgroup/tg-0123456789abcdef0"
    aws.add_lattice_source(group.name, lattice)
    status = balanced("status", env=env)
    assert f"unchecked  vpc-lattice:{lattice}" in status.stdout
    out = balanced("out", env=env)
    assert_summary(out, "out", "OK", 0)
    assert f"WARNING: traffic source vpc-lattice:{lattice} cannot be checked by this tool" in out.stderr


# Idempotence -------------------------------------------------------------------------------------


def test_out_twice_and_in_twice_are_fine(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=1)
    on(imds, group.instance_ids[0])
    assert_summary(balanced("out", env=env), "out", "OK", 0)
    again = balanced("out", env=env)
    assert_summary(again, "out", "OK", 0)
    assert "already Standby" in again.stderr
    assert balanced("in", env=env).code == 0
    again = balanced("in", env=env)
    assert_summary(again, "in", "OK", 0)
    assert "already InService" in again.stderr
    assert mutations(aws) == ["EnterStandby", "ExitStandby"]


def test_in_after_an_interrupted_out_waits_for_standby_then_returns(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1, deregistration_delay=1.5)
    me = group.instance_ids[0]
    on(imds, me)
    aws.client("autoscaling").enter_standby(
        AutoScalingGroupName=group.name, InstanceIds=[me], ShouldDecrementDesiredCapacity=True
    )
    assert aws.lifecycle(me) == "EnteringStandby"
    run = balanced("in", env=env)
    assert_summary(run, "in", "OK", 0)
    assert "EnteringStandby" in run.stderr
    assert aws.lifecycle(me) == "InService" and aws.target_state(me, group.tg_arns[0]) == "healthy"


# MinSize: the durable record -------------------------------------------------------------------------


def test_desired_equal_to_min_lowers_min_size_with_a_tag_and_in_restores_it(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=2, min_size=2, max_size=2)
    on(imds, group.instance_ids[0])
    out = balanced("out", env=env)
    assert_summary(out, "out", "OK", 0)
    assert aws.group_sizes(group.name) == (1, 1, 2)
    assert aws.group_tags(group.name)["balanced:min-size"] == "original=2 rollout=1"
    assert mutations(aws) == ["CreateOrUpdateTags", "UpdateAutoScalingGroup", "EnterStandby"]

    aws.clear_calls()
    back = balanced("in", env=env)
    assert_summary(back, "in", "OK", 0)
    assert aws.group_sizes(group.name) == (2, 2, 2)
    assert "balanced:min-size" not in aws.group_tags(group.name)
    # Restored only after ExitStandby: otherwise AWS raises desired and launches an instance.
    assert mutations(aws) == ["ExitStandby", "UpdateAutoScalingGroup", "DeleteTags"]
    assert (
        len(aws.client("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"][0]["Instances"])
        == 2
    )

    aws.clear_calls()
    assert balanced("in", env=env).code == 0  # a second in restores nothing twice
    assert mutations(aws) == []


def test_a_stale_record_with_another_floor_is_rewritten_not_trusted(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=0, max_size=4)
    on(imds, group.instance_ids[0])
    asg = aws.client("autoscaling")
    asg.create_or_update_tags(  # left by an earlier rollout that held MinSize at 1
        Tags=[
            {
                "ResourceId": group.name,
                "ResourceType": "auto-scaling-group",
                "Key": "balanced:min-size",
                "Value": "original=0 rollout=1",
                "PropagateAtLaunch": False,
            }
        ]
    )
    asg.update_auto_scaling_group(AutoScalingGroupName=group.name, MinSize=1)
    assert_summary(balanced("out", "--min-healthy", "2", env=env), "out", "OK", 0)
    assert aws.group_tags(group.name)["balanced:min-size"] == "original=0 rollout=2"
    assert_summary(balanced("in", env=env), "in", "OK", 0)
    assert aws.group_sizes(group.name)[0] == 0  # the operator's own MinSize, not a floor
    assert "balanced:min-size" not in aws.group_tags(group.name)


def test_a_min_size_changed_by_someone_else_is_not_overwritten(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=2, min_size=2, max_size=3)
    on(imds, group.instance_ids[0])
    assert balanced("out", env=env).code == 0
    aws.client("autoscaling").update_auto_scaling_group(AutoScalingGroupName=group.name, MinSize=0)
    back = balanced("in", env=env)
    assert_summary(back, "in", "OK", 0)
    assert "set by someone else" in back.stderr
    assert aws.group_sizes(group.name)[0] == 0
    assert "balanced:min-size" not in aws.group_tags(group.name)


# Gates: refused, nothing changed -------------------------------------------------------------------


def start_activity(aws: Any, group: Any) -> None:
    aws.start_activity(group.name, "Launching a new EC2 instance: i-0123456789abcdef0")


def start_refresh(aws: Any, group: Any) -> None:
    aws.start_instance_refresh(group.name)


def suspend(process: str) -> Any:
    def apply(aws: Any, group: Any) -> None:
        aws.client("autoscaling").suspend_processes(
            AutoScalingGroupName=group.name, ScalingProcesses=[process]
        )

    return apply


def peers_unhealthy(aws: Any, group: Any) -> None:
    for peer in group.instance_ids[1:]:
        aws.set_target_health(peer, "unhealthy", "Target.FailedHealthChecks")


def me_pending(aws: Any, group: Any) -> None:
    aws.set_lifecycle(group.instance_ids[0], "Pending")


@pytest.mark.parametrize(
    ("make_unsafe", "reason"),
    [
        (start_activity, "scaling activity in progress: Launching a new EC2 instance"),
        (start_refresh, "instance refresh in progress"),
        (suspend("Launch"), "suspended process Launch would keep this instance from coming back"),
        (suspend("AddToLoadBalancer"), "suspended process AddToLoadBalancer"),
        (peers_unhealthy, "only 0 other instance(s) serving in web-asg, need 1"),
        (me_pending, "this instance is Pending, not InService"),
    ],
    ids=[
        "activity",
        "refresh",
        "launch-suspended",
        "add-to-lb-suspended",
        "too-few-healthy",
        "not-in-service",
    ],
)
def test_out_is_refused_with_nothing_changed(
    aws: Any, imds: Any, env: dict[str, str], make_unsafe: Any, reason: str
) -> None:
    group = aws.make_group(size=3, min_size=1)
    on(imds, group.instance_ids[0])
    make_unsafe(aws, group)
    aws.clear_calls()
    run = balanced("out", env=env)
    assert_summary(run, "out", "REFUSED", 3)
    assert reason in run.summary and "nothing changed; safe to retry later" in run.summary
    assert mutations(aws) == []
    assert aws.lifecycle(group.instance_ids[0]) in ("InService", "Pending")


def test_min_healthy_counts_other_instances_that_serve(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=4, min_size=0)
    on(imds, group.instance_ids[0])
    aws.set_target_health(group.instance_ids[3], "unhealthy")
    refused = balanced("out", "--min-healthy", "3", env=env)
    assert_summary(refused, "out", "REFUSED", 3)
    assert "only 2 other instance(s) serving" in refused.summary and "need 3" in refused.summary
    assert_summary(balanced("out", "--min-healthy", "2", "--dry-run", env=env), "out", "OK", 0)
    assert mutations(aws) == []


def test_min_healthy_larger_than_the_group_can_never_be_met(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=0)
    on(imds, group.instance_ids[0])
    refused = balanced("out", "--min-healthy", "50", env=env)
    assert_summary(refused, "out", "REFUSED", 3)
    assert "can never be met" in refused.summary and mutations(aws) == []


def test_in_refuses_while_launch_is_suspended(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=1)
    on(imds, group.instance_ids[0])
    assert balanced("out", env=env).code == 0
    suspend("Launch")(aws, group)
    aws.clear_calls()
    run = balanced("in", env=env)
    assert_summary(run, "in", "REFUSED", 3)
    assert "resume-processes" in run.summary and mutations(aws) == []


def test_wait_does_not_wait_for_what_waiting_cannot_cure(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=0)
    on(imds, group.instance_ids[0])
    run = balanced("out", "--wait", "--min-healthy", "50", "--timeout", "120", env=env)
    assert_summary(run, "out", "REFUSED", 3)
    assert "can never be met" in run.summary and "waiting for a slot" not in run.stderr


def test_dry_run_waits_for_nothing(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=1, deregistration_delay=30)
    me = group.instance_ids[0]
    on(imds, me)
    aws.start_activity(group.name)  # a gate that would keep --wait waiting
    refused = balanced("out", "--dry-run", "--wait", "--timeout", "120", env=env)
    assert_summary(refused, "out", "REFUSED", 3)
    assert "waiting for a slot" not in refused.stderr
    aws.client("autoscaling", internal=True).enter_standby(
        AutoScalingGroupName=group.name, InstanceIds=[me], ShouldDecrementDesiredCapacity=True
    )
    for command in ("out", "in"):  # both would wait out a 30 s drain for real
        run = balanced(command, "--dry-run", "--timeout", "120", env=env)
        assert_summary(run, command, "OK", 0)
        assert "dry run: " in run.summary and "waiting:" not in run.stderr
    assert mutations(aws) == [] and aws.lifecycle(me) == "EnteringStandby"


def test_dry_run_changes_nothing_and_tells_the_plan(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=2, min_size=2)
    on(imds, group.instance_ids[0])
    run = balanced("out", "--dry-run", env=env)
    assert_summary(run, "out", "OK", 0)
    assert "would set MinSize 2 -> 1, then EnterStandby" in run.summary
    assert mutations(aws) == [] and aws.lifecycle(group.instance_ids[0]) == "InService"


# Timeouts: exit 4 with the state left --------------------------------------------------------------


def test_out_timeout_reports_the_state_it_left(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=1)
    on(imds, group.instance_ids[0])
    aws.standby_lag = 60  # AWS keeps the instance EnteringStandby well past the drain
    run = balanced("out", "--timeout", "3", env=env)
    assert_summary(run, "out", "TIMEOUT", 4)
    assert "last seen: lifecycle EnteringStandby" in run.summary
    assert "left EnteringStandby" in run.summary and "rerun 'balanced.py out'" in run.summary


def test_in_timeout_reports_the_unhealthy_target(aws: Any, imds: Any, env: dict[str, str]) -> None:
    group = aws.make_group(size=3, min_size=1)
    me = group.instance_ids[0]
    on(imds, me)
    assert balanced("out", env=env).code == 0
    aws.set_target_health(me, "unhealthy", "Target.ResponseCodeMismatch")
    run = balanced("in", "--timeout", "3", env=env)
    assert_summary(run, "in", "TIMEOUT", 4)
    assert f"tg/{group.tg_names[0]} unhealthy (Target.ResponseCodeMismatch)" in run.summary
    assert "rerun 'balanced.py in'" in run.summary


def test_out_refuses_when_the_drain_cannot_fit_in_the_timeout(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=3, min_size=1, deregistration_delay=30)
    on(imds, group.instance_ids[0])
    run = balanced("out", "--timeout", "5", env=env)
    assert_summary(run, "out", "REFUSED", 3)
    assert "may drain for 30s" in run.summary and mutations(aws) == []


# Environment: exit 5 -----------------------------------------------------------------------------------


def test_an_instance_in_no_group_is_an_environment_error(aws: Any, imds: Any, env: dict[str, str]) -> None:
    aws.make_group(size=2)
    on(imds, "i-0000000000000dead")
    run = balanced("out", env=env)
    assert_summary(run, "out", "ENVIRONMENT", 5)
    assert "i-0000000000000dead is not in any Auto Scaling group" in run.summary


def test_metadata_unreachable_is_exit_5(aws: Any) -> None:
    env = aws.env(AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:9/", AWS_REGION=None)
    run = balanced("out", env=env, timeout=30)
    assert_summary(run, "out", "ENVIRONMENT", 5)
    assert "instance metadata unreachable at http://127.0.0.1:9/" in run.summary


def test_metadata_requires_the_token_and_region_comes_from_the_identity_document(
    aws: Any, imds: Any, env: dict[str, str]
) -> None:
    group = aws.make_group(size=2, min_size=1)
    on(imds, group.instance_ids[0])
    assert balanced("status", env=env).code == 0
    methods = [(r[0], r[1]) for r in imds.requests]
    assert methods[0] == ("PUT", "/latest/api/token")
    assert ("GET", "/latest/dynamic/instance-identity/document") in methods


@pytest.mark.parametrize(
    "args",
    [
        ["sideways"],
        ["out", "--timeout", "-5"],
        ["in", "--poll", "soon"],
        ["out", "--min-healthy-percent", "200"],
    ],
)
def test_bad_arguments_exit_2_without_a_traceback(args: list[str], aws: Any) -> None:
    run = balanced(*args, env=aws.env(), fast=False)
    assert run.code == 2, run
    assert "usage: balanced" in run.stderr and "Traceback" not in run.stderr
