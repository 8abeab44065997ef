"""The local AWS (tests/localaws.py) and the fake IMDS (tests/imds.py) behave like AWS.

Timing assertions are only "before the delay it is X; later (polled, with a deadline) it is Y"."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.imds import FakeIMDS
from tests.localaws import Group, LocalAWS


def eventually(read: Callable[[], object], expected: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := read()) != expected:
        assert time.monotonic() < deadline, f"still {value!r}, wanted {expected!r}"
        time.sleep(0.05)


def error_of(call: Callable[[], Any]) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    return info.value


def target_health(aws: LocalAWS, tg_arn: str, instance_id: str | None = None) -> Any:
    kwargs: dict[str, Any] = {"Targets": [{"Id": instance_id}]} if instance_id else {}
    return aws.client("elbv2").describe_target_health(TargetGroupArn=tg_arn, **kwargs)[
        "TargetHealthDescriptions"
    ]


def asg_instance(aws: LocalAWS, instance_id: str) -> Any:
    (row,) = aws.client("autoscaling").describe_auto_scaling_instances(InstanceIds=[instance_id])[
        "AutoScalingInstances"
    ]
    return row


def activity(aws: LocalAWS, activity_id: str) -> Any:
    (row,) = aws.client("autoscaling").describe_scaling_activities(ActivityIds=[activity_id])["Activities"]
    return row


def enter(aws: LocalAWS, group: Group, instance_id: str) -> Any:
    response = aws.client("autoscaling").enter_standby(
        AutoScalingGroupName=group.name, InstanceIds=[instance_id], ShouldDecrementDesiredCapacity=True
    )
    return response["Activities"][0]


def group_instance_ids(aws: LocalAWS, name: str) -> list[str]:
    (g,) = aws.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[name])[
        "AutoScalingGroups"
    ]
    return sorted(i["InstanceId"] for i in g["Instances"])


# -- EnterStandby -----------------------------------------------------------------------------


def test_make_group_is_healthy_everywhere(aws: LocalAWS) -> None:
    g = aws.make_group(size=3, classic_elbs=1)
    assert len(g.instance_ids) == 3 and len(g.tg_arns) == 1 and len(g.elb_names) == 1
    assert {d["TargetHealth"]["State"] for d in target_health(aws, g.tg_arns[0])} == {"healthy"}
    states = aws.client("elb").describe_instance_health(LoadBalancerName=g.elb_names[0])["InstanceStates"]
    assert {s["State"] for s in states} == {"InService"}
    assert asg_instance(aws, g.instance_ids[0])["HealthStatus"] == "HEALTHY"  # AWS casing here
    attrs = aws.client("elbv2").describe_target_group_attributes(TargetGroupArn=g.tg_arns[0])["Attributes"]
    assert {"Key": "deregistration_delay.timeout_seconds", "Value": "1"} in attrs
    assert aws.group_sizes(g.name) == (3, 3, 5)


def test_enter_standby_drains_then_standby(aws: LocalAWS) -> None:
    g = aws.make_group(size=3, min_size=2, deregistration_delay=1.0)
    iid = g.instance_ids[0]
    act = enter(aws, g, iid)

    assert act["Description"] == f"Moving EC2 instance to Standby: {iid}"
    assert act["StatusCode"] == "InProgress"
    assert "shrinking the capacity from 3 to 2" in act["Cause"]
    assert aws.group_sizes(g.name) == (2, 2, 5)
    assert asg_instance(aws, iid)["LifecycleState"] == "EnteringStandby"
    (draining,) = target_health(aws, g.tg_arns[0], iid)
    assert draining["TargetHealth"]["State"] == "draining"
    assert draining["TargetHealth"]["Reason"] == "Target.DeregistrationInProgress"
    assert activity(aws, act["ActivityId"])["StatusCode"] == "InProgress"

    eventually(lambda: asg_instance(aws, iid)["LifecycleState"], "Standby")
    (unused,) = target_health(aws, g.tg_arns[0], iid)
    assert unused["TargetHealth"]["State"] == "unused"
    assert unused["TargetHealth"]["Reason"] == "Target.NotRegistered"
    assert iid not in {d["Target"]["Id"] for d in target_health(aws, g.tg_arns[0])}
    assert activity(aws, act["ActivityId"])["StatusCode"] == "Successful"
    # Nothing was launched or terminated.
    assert group_instance_ids(aws, g.name) == sorted(g.instance_ids)


def test_standby_waits_for_the_slowest_lb_and_the_lag(aws: LocalAWS) -> None:
    g = aws.make_group(size=2, min_size=0, target_groups=2, deregistration_delay=0.2)
    aws.set_deregistration_delay(g.tg_arns[1], 1.5)
    aws.standby_lag = 0.2
    iid = g.instance_ids[0]
    enter(aws, g, iid)
    eventually(lambda: aws.target_state(iid, g.tg_arns[0]), "unused")
    assert aws.target_state(iid, g.tg_arns[1]) == "draining"
    assert aws.lifecycle(iid) == "EnteringStandby"
    eventually(lambda: aws.target_state(iid, g.tg_arns[1]), "unused")
    eventually(lambda: aws.lifecycle(iid), "Standby")


def test_enter_standby_below_min_size_is_rejected(aws: LocalAWS) -> None:
    g = aws.make_group(name="tight-asg", size=2)
    err = error_of(lambda: enter(aws, g, g.instance_ids[0]))
    assert err.response["Error"]["Code"] == "ValidationError"
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert err.response["Error"]["Message"] == (
        "AutoScalingGroup tight-asg has min-size=2, max-size=4, and desired-size=2. "
        "To place into standby 1 instance, please update the AutoScalingGroup sizes appropriately."
    )
    assert aws.lifecycle(g.instance_ids[0]) == "InService"
    assert aws.group_sizes(g.name) == (2, 2, 4)


def test_enter_standby_requires_in_service(aws: LocalAWS) -> None:
    g = aws.make_group(size=3, min_size=0)
    aws.set_lifecycle(g.instance_ids[0], "Pending")
    err = error_of(lambda: enter(aws, g, g.instance_ids[0]))
    assert err.response["Error"]["Message"] == f"The instance {g.instance_ids[0]} is not in InService."


def test_concurrent_enter_standby_respects_min_size(aws: LocalAWS) -> None:
    g = aws.make_group(size=8, min_size=6, max_size=8)
    clients = [aws.client("autoscaling", max_attempts=1) for _ in g.instance_ids]
    barrier = threading.Barrier(len(clients))
    outcomes: list[str] = []

    def go(client: Any, iid: str) -> None:
        barrier.wait()
        try:
            client.enter_standby(
                AutoScalingGroupName=g.name, InstanceIds=[iid], ShouldDecrementDesiredCapacity=True
            )
            outcomes.append("ok")
        except ClientError as e:
            outcomes.append(e.response["Error"]["Code"])

    threads = [threading.Thread(target=go, args=a) for a in zip(clients, g.instance_ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ValidationError"] * 6 + ["ok"] * 2
    assert aws.group_sizes(g.name) == (6, 6, 8)


# -- ExitStandby ------------------------------------------------------------------------------


def _in_standby(aws: LocalAWS, **kwargs: Any) -> tuple[Group, str]:
    g = aws.make_group(size=3, min_size=2, deregistration_delay=0.1, connection_draining=0.1, **kwargs)
    iid = g.instance_ids[0]
    enter(aws, g, iid)
    eventually(lambda: aws.lifecycle(iid), "Standby")
    return g, iid


def test_exit_standby_pending_then_in_service_and_healthy(aws: LocalAWS) -> None:
    g, iid = _in_standby(aws, health_seconds=1.2, pending_seconds=0.8)
    response = aws.client("autoscaling").exit_standby(AutoScalingGroupName=g.name, InstanceIds=[iid])
    (act,) = response["Activities"]
    assert act["Description"] == f"Moving EC2 instance out of Standby: {iid}"
    assert act["StatusCode"] == "PreInService"
    assert aws.group_sizes(g.name) == (2, 3, 5)
    assert asg_instance(aws, iid)["LifecycleState"] == "Pending"
    (initial,) = target_health(aws, g.tg_arns[0], iid)
    assert initial["TargetHealth"] == {
        "State": "initial",
        "Reason": "Elb.RegistrationInProgress",
        "Description": "Target registration is in progress",
    }

    eventually(lambda: asg_instance(aws, iid)["LifecycleState"], "InService")
    eventually(lambda: activity(aws, act["ActivityId"])["StatusCode"], "Successful")
    eventually(lambda: target_health(aws, g.tg_arns[0], iid)[0]["TargetHealth"]["State"], "healthy")
    assert group_instance_ids(aws, g.name) == sorted(g.instance_ids)


def test_exit_standby_validation(aws: LocalAWS) -> None:
    g, iid = _in_standby(aws)
    asg = aws.client("autoscaling")
    err = error_of(lambda: asg.exit_standby(AutoScalingGroupName=g.name, InstanceIds=[g.instance_ids[1]]))
    assert err.response["Error"]["Message"] == f"The instance {g.instance_ids[1]} is not in Standby."
    asg.update_auto_scaling_group(AutoScalingGroupName=g.name, MaxSize=2)
    err = error_of(lambda: asg.exit_standby(AutoScalingGroupName=g.name, InstanceIds=[iid]))
    assert err.response["Error"]["Code"] == "ValidationError"
    assert aws.lifecycle(iid) == "Standby"


def test_classic_elb_draining_and_registration(aws: LocalAWS) -> None:
    g = aws.make_group(size=2, min_size=1, target_groups=0, classic_elbs=1, connection_draining=1.0)
    iid, elb_name = g.instance_ids[0], g.elb_names[0]
    elb = aws.client("elb")

    def state() -> tuple[str, str]:
        (s,) = elb.describe_instance_health(LoadBalancerName=elb_name, Instances=[{"InstanceId": iid}])[
            "InstanceStates"
        ]
        return (s["State"], s["Description"])

    enter(aws, g, iid)
    assert state() == ("InService", "Instance deregistration currently in progress.")
    assert aws.lifecycle(iid) == "EnteringStandby"
    eventually(state, ("OutOfService", "Instance is not currently registered with the LoadBalancer."))
    listed = elb.describe_instance_health(LoadBalancerName=elb_name)["InstanceStates"]
    assert [s["InstanceId"] for s in listed] == [g.instance_ids[1]]
    eventually(lambda: aws.lifecycle(iid), "Standby")

    aws.client("autoscaling").exit_standby(AutoScalingGroupName=g.name, InstanceIds=[iid])
    assert state() == ("OutOfService", "Instance registration is still in progress.")
    eventually(state, ("InService", "N/A"))


# -- UpdateAutoScalingGroup, tags ---------------------------------------------------------------


def test_update_sizes_never_launches_or_terminates(aws: LocalAWS) -> None:
    g = aws.make_group(size=3)
    asg = aws.client("autoscaling")
    asg.update_auto_scaling_group(AutoScalingGroupName=g.name, MinSize=2)
    assert aws.group_sizes(g.name) == (2, 3, 5)
    asg.create_or_update_tags(
        Tags=[
            {
                "ResourceId": g.name,
                "ResourceType": "auto-scaling-group",
                "Key": "k",
                "Value": "v",
                "PropagateAtLaunch": False,
            }
        ]
    )
    assert aws.group_tags(g.name) == {"k": "v"}
    asg.delete_tags(Tags=[{"ResourceId": g.name, "ResourceType": "auto-scaling-group", "Key": "k"}])
    assert aws.group_tags(g.name) == {}

    asg.update_auto_scaling_group(AutoScalingGroupName=g.name, MinSize=4)  # AWS raises desired too
    assert aws.group_sizes(g.name) == (4, 4, 5)
    assert aws.size_changes == [(g.name, 3, 4, "UpdateAutoScalingGroup")]
    assert group_instance_ids(aws, g.name) == sorted(g.instance_ids)
    err = error_of(lambda: asg.update_auto_scaling_group(AutoScalingGroupName=g.name, DesiredCapacity=9))
    assert err.response["Error"]["Code"] == "ValidationError"


# -- Describe* additions ----------------------------------------------------------------------


def test_instance_refreshes_and_traffic_sources(aws: LocalAWS) -> None:
    g = aws.make_group(size=1, classic_elbs=1)
    asg = aws.client("autoscaling")
    assert asg.describe_instance_refreshes(AutoScalingGroupName=g.name)["InstanceRefreshes"] == []
    old = aws.start_instance_refresh(g.name, status="Successful")
    new = aws.start_instance_refresh(g.name)
    refreshes = asg.describe_instance_refreshes(AutoScalingGroupName=g.name)["InstanceRefreshes"]
    assert [(r["InstanceRefreshId"], r["Status"]) for r in refreshes] == [
        (new, "InProgress"),
        (old, "Successful"),
    ]
    aws.finish_instance_refresh(new, "Cancelled")
    assert (
        asg.describe_instance_refreshes(AutoScalingGroupName=g.name)["InstanceRefreshes"][0]["Status"]
        == "Cancelled"
    )

    lattice = "arn:aws:vpc-lattice:us-east-1:123456789012:targetgroup/tg-0123456789abcdef0"
    aws.add_lattice_source(g.name, lattice)
    sources = asg.describe_traffic_sources(AutoScalingGroupName=g.name)["TrafficSources"]
    assert [(s["Identifier"], s["Type"]) for s in sources] == [
        (g.tg_arns[0], "elbv2"),
        (g.elb_names[0], "elb"),
        (lattice, "vpc-lattice"),
    ]
    first = asg.describe_traffic_sources(AutoScalingGroupName=g.name, MaxRecords=2)
    rest = asg.describe_traffic_sources(AutoScalingGroupName=g.name, NextToken=first["NextToken"])
    assert len(first["TrafficSources"]) == 2 and len(rest["TrafficSources"]) == 1 and "NextToken" not in rest
    only = asg.describe_traffic_sources(AutoScalingGroupName=g.name, TrafficSourceType="elb")[
        "TrafficSources"
    ]
    assert [s["Identifier"] for s in only] == [g.elb_names[0]]
    (group,) = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[g.name])["AutoScalingGroups"]
    assert len(group["TrafficSources"]) == 3


def test_scaling_activities_in_progress_first(aws: LocalAWS) -> None:
    g = aws.make_group(size=3, min_size=2, deregistration_delay=5)  # the standby stays in progress
    done = aws.start_activity(g.name, "Launching a new EC2 instance: i-0aaa")
    aws.finish_activity(done)
    standby = enter(aws, g, g.instance_ids[0])["ActivityId"]
    running = aws.start_activity(g.name)
    rows = aws.client("autoscaling").describe_scaling_activities(AutoScalingGroupName=g.name)["Activities"]
    assert [r["ActivityId"] for r in rows] == [running, standby, done]
    assert [r["StatusCode"] for r in rows] == ["InProgress", "InProgress", "Successful"]


# -- test controls ----------------------------------------------------------------------------


def test_health_overrides_terminate_and_detach(aws: LocalAWS) -> None:
    g = aws.make_group(size=3, min_size=0, classic_elbs=1, deregistration_delay=0.3)
    a, b, c = g.instance_ids
    aws.set_target_health(a)
    assert target_health(aws, g.tg_arns[0], a)[0]["TargetHealth"]["Reason"] == "Target.FailedHealthChecks"
    aws.set_target_health(a, None)
    assert aws.target_state(a, g.tg_arns[0]) == "healthy"
    aws.set_elb_health(a)
    assert aws.elb_state(a, g.elb_names[0])[0] == "OutOfService"

    aws.terminate(b)
    assert (
        aws.client("autoscaling").describe_auto_scaling_instances(InstanceIds=[b])["AutoScalingInstances"]
        == []
    )
    assert target_health(aws, g.tg_arns[0], b)[0]["TargetHealth"]["Reason"] == "Target.InvalidState"

    aws.detach_target_group(g.name, g.tg_arns[0])
    assert aws.target_state(c, g.tg_arns[0]) == "draining"
    eventually(lambda: aws.target_state(c, g.tg_arns[0]), "unused")

    aws.delete_target_group(g.tg_arns[0])
    err = error_of(lambda: target_health(aws, g.tg_arns[0]))
    assert err.response["Error"]["Code"] == "TargetGroupNotFound"


# -- recorder and faults ----------------------------------------------------------------------


def test_call_recorder(aws: LocalAWS) -> None:
    g = aws.make_group(size=2, min_size=1)
    assert aws.calls == []  # make_group's setup requests are not recorded
    enter(aws, g, g.instance_ids[0])
    target_health(aws, g.tg_arns[0])
    (call,) = aws.calls_of("EnterStandby")
    assert call.service == "autoscaling"
    assert call.params["InstanceIds.member.1"] == g.instance_ids[0]
    assert call.params["ShouldDecrementDesiredCapacity"] == "true"
    (dth,) = aws.calls_of("DescribeTargetHealth")
    assert (dth.service, dth.version) == ("elasticloadbalancing", "2015-12-01")
    assert call.time <= dth.time
    aws.clear_calls()
    assert aws.calls == []


def test_fail_next(aws: LocalAWS) -> None:
    aws.make_group(size=1)
    asg = aws.client("autoscaling", max_attempts=1)
    aws.fail_next("DescribeAutoScalingGroups", count=2)
    for _ in range(2):
        err = error_of(asg.describe_auto_scaling_groups)
        assert err.response["Error"] == {"Type": "Sender", "Code": "Throttling", "Message": "Rate exceeded"}
        assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert len(asg.describe_auto_scaling_groups()["AutoScalingGroups"]) == 1
    assert [c.fault for c in aws.calls_of("DescribeAutoScalingGroups")] == ["Throttling", "Throttling", None]

    aws.fail_next("DescribeTargetHealth", code="ServiceUnavailable", message="Try later", status=503)
    elbv2 = aws.client("elbv2", max_attempts=1)
    err = error_of(lambda: elbv2.describe_target_health(TargetGroupArn="arn:x"))
    assert err.response["Error"]["Code"] == "ServiceUnavailable"
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 503


def test_throttle_and_default_retries(aws: LocalAWS) -> None:
    aws.make_group(size=1)
    asg = aws.client("autoscaling", max_attempts=1)
    aws.throttle(1.0, actions=["DescribeScalingActivities"])
    assert error_of(asg.describe_scaling_activities).response["Error"]["Code"] == "Throttling"
    asg.describe_auto_scaling_groups()  # other actions unaffected

    aws.throttle(0.5, seed=1)
    outcomes = []
    for _ in range(40):
        try:
            asg.describe_auto_scaling_groups()
            outcomes.append(True)
        except ClientError as e:
            assert e.response["Error"]["Code"] == "Throttling"
            outcomes.append(False)
    assert 5 < outcomes.count(False) < 35

    aws.clear_faults()
    aws.fail_next("DescribeAutoScalingGroups")
    retrying = aws.client("autoscaling", max_attempts=3)
    assert retrying.describe_auto_scaling_groups()["ResponseMetadata"]["RetryAttempts"] == 1


def test_env_for_subprocesses(aws: LocalAWS) -> None:
    env = aws.env(EXTRA="1", AWS_REGION=None)
    assert env["AWS_ENDPOINT_URL"] == aws.endpoint and env["EXTRA"] == "1" and "AWS_REGION" not in env
    assert env["AWS_CONFIG_FILE"] == env["AWS_SHARED_CREDENTIALS_FILE"] == "/dev/null"
    assert "PATH" in env

    g = aws.make_group(size=1)
    # botocore itself reads AWS_DEFAULT_REGION, not AWS_REGION: the program must pass the region.
    script = (
        "import boto3, os; asg = boto3.client('autoscaling', region_name=os.environ['AWS_REGION']); "
        "print(asg.describe_auto_scaling_groups())"
    )
    argv = [sys.executable, "-c", script]
    out = subprocess.run(argv, env=aws.env(), capture_output=True, text=True, timeout=60)
    assert f"'AutoScalingGroupName': '{g.name}'" in out.stdout, out.stderr
    assert [c.service for c in aws.calls_of("DescribeAutoScalingGroups")] == ["autoscaling"]


# -- FakeIMDS ---------------------------------------------------------------------------------


def _request(
    imds: FakeIMDS, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, str]:
    req = urllib.request.Request(imds.endpoint.rstrip("/") + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def _token(imds: FakeIMDS) -> str:
    status, token = _request(imds, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200
    return token


def _get(imds: FakeIMDS, path: str, token: str | None = None) -> tuple[int, str]:
    return _request(imds, "GET", path, {"X-aws-ec2-metadata-token": token} if token else {})


def test_imds_v2(imds: FakeIMDS) -> None:
    imds.instance_id, imds.region = "i-0abc", "eu-west-1"
    assert _request(imds, "PUT", "/latest/api/token")[0] == 400  # TTL header required
    token = _token(imds)
    assert _get(imds, "/latest/meta-data/instance-id") == (401, "")
    assert _get(imds, "/latest/meta-data/instance-id", "bogus") == (401, "")
    assert _get(imds, "/latest/meta-data/instance-id", token) == (200, "i-0abc")
    assert _get(imds, "/latest/meta-data/placement/region", token) == (200, "eu-west-1")
    assert _get(imds, "/latest/meta-data/placement/availability-zone", token) == (200, "eu-west-1a")
    status, doc = _get(imds, "/latest/dynamic/instance-identity/document", token)
    assert status == 200 and '"instanceId": "i-0abc"' in doc
    assert _get(imds, "/latest/meta-data/nope", token)[0] == 404
    assert [r[:2] for r in imds.requests[:2]] == [("PUT", "/latest/api/token"), ("PUT", "/latest/api/token")]
    assert imds.requests[2][2].get("X-aws-ec2-metadata-token") is None


def test_imds_v1_expire_forbidden(imds: FakeIMDS) -> None:
    imds.mode = "v1"
    assert (
        _request(imds, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})[0] == 404
    )
    assert _get(imds, "/latest/meta-data/instance-id") == (200, imds.instance_id)

    imds.mode = "expire"
    first = _token(imds)
    assert _get(imds, "/latest/meta-data/instance-id", first)[0] == 401
    assert _get(imds, "/latest/meta-data/instance-id", first)[0] == 401  # it stays expired
    assert _get(imds, "/latest/meta-data/instance-id", _token(imds)) == (200, imds.instance_id)

    imds.mode = "forbidden"
    assert (
        _request(imds, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})[0] == 403
    )
    assert _get(imds, "/latest/meta-data/instance-id")[0] == 403


def test_imds_hang_times_out_and_stops_cleanly() -> None:
    fake = FakeIMDS(mode="hang").start()
    try:
        with pytest.raises(OSError):  # socket timeout (TimeoutError / URLError)
            _request(
                fake, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, timeout=0.3
            )
    finally:
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 3
