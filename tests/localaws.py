"""A "local AWS" for balanced.py's tests: moto's server, extended in-process to behave like AWS.

Stock moto 5.2 flips EnterStandby/ExitStandby instantly, launches/terminates instances whenever the
desired capacity changes, skips AWS's MinSize validation, reports every registered target as
healthy and lacks DescribeInstanceRefreshes/DescribeTrafficSources. balanced.py's whole job is to
wait for the slow parts (draining, health checks), so this module keeps a small simulation
(`_Sim`) next to moto's backends and patches moto's response classes to answer from it:

* EnterStandby: validated like AWS; the instance is EnteringStandby while every attached target
  group / classic ELB drains it (deregistration delay / connection-draining timeout), then Standby.
* ExitStandby: Pending for `pending_seconds`, then InService; LBs report initial/OutOfService
  ("registration in progress") for `health_seconds`, then healthy/InService.
* Capacity changes never make moto launch or terminate anything.

Time is evaluated lazily: every request (and every test control call) first runs `_Sim.advance()`,
which applies the transitions that are due. One re-entrant lock serializes all requests and
controls, which is also what makes EnterStandby's MinSize check atomic, as it is on AWS.

The server runs in the test process (one per pytest session); `LocalAWS.reset()` wipes state.
A WSGI gateway in front of moto records calls and injects faults (throttling etc.).

Simplifications (documented, deliberate):
* Only account 123456789012 / us-east-1.
* EnterStandby with ShouldDecrementDesiredCapacity=false is rejected (balanced never uses it).
* `health_seconds`, `pending_seconds` and `standby_lag` are global knobs, not per group.
* Raising MinSize above the desired capacity raises the desired capacity (as AWS does) but launches
  nothing; see `LocalAWS.size_changes`.
* Groups created through the API directly (not `make_group`) are adopted on the next request with
  every instance registered and healthy in every attached LB.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

import boto3
from botocore.config import Config
from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.models import FakeAutoScalingGroup, InstanceState, autoscaling_backends
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.core.responses import ActionResult, BaseResponse
from moto.ec2.models import ec2_backends
from moto.elb.exceptions import ELBClientError
from moto.elb.exceptions import LoadBalancerNotFoundError as ElbNotFound
from moto.elb.models import elb_backends
from moto.elb.responses import ELBResponse
from moto.elbv2.exceptions import InvalidTargetError, TargetGroupNotFoundError
from moto.elbv2.models import elbv2_backends
from moto.elbv2.responses import ELBV2Response
from moto.moto_api._internal.models import moto_api_backend
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

ACCOUNT = DEFAULT_ACCOUNT_ID
REGION = "us-east-1"
AMI_ID = "ami-12c6146b"  # moto's stock example AMI; AMI validation is off by default anyway
INTERNAL_HEADER = "x-localaws-internal"  # marks setup requests: not recorded, never faulted

# An LB the sim tracks memberships for: ("tg", target group ARN) or ("elb", classic ELB name).
LbKey = tuple[str, str]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

TERMINAL_ACTIVITY = frozenset({"Successful", "Failed", "Cancelled"})
ACTIVE_REFRESH = frozenset({"Pending", "InProgress", "Cancelling", "RollbackInProgress", "Baking"})


def _now_utc() -> datetime:
    return datetime.now(timezone.utc)


def _sizes(group: FakeAutoScalingGroup) -> tuple[int, int, int]:
    """(MinSize, DesiredCapacity, MaxSize); moto types them Optional, but a group always has them."""
    return (group.min_size or 0, group.desired_capacity or 0, group.max_size or 0)


def _page(
    items: list[Any], next_token: str | None, max_records: int | None, default: int
) -> tuple[list[Any], str | None]:
    """Index-based NextToken paging, enough for clients that loop on NextToken."""
    start = int(next_token) if next_token else 0
    size = max_records or default
    end = start + size
    return items[start:end], (str(end) if end < len(items) else None)


# --------------------------------------------------------------------------------------------
# Simulation state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One instance as `LocalAWS.fleet_snapshot` saw it."""

    instance_id: str
    lifecycle: str
    serving: bool  # InService, Healthy, and healthy in every load balancer of the group


@dataclass
class Group:
    """What `LocalAWS.make_group` built."""

    name: str
    instance_ids: list[str]
    tg_arns: list[str]
    tg_names: list[str]
    elb_names: list[str]


@dataclass
class _Membership:
    """One instance's registration in one LB, as two timestamps (time.monotonic())."""

    registered_at: float = -math.inf  # -inf: registered (and healthy) before the sim saw it
    deregistered_at: float | None = None


@dataclass
class _SimInstance:
    instance_id: str
    group_name: str
    pending_until: float | None = None  # ExitStandby: Pending -> InService at this time
    entering_since: float | None = None  # EnterStandby: EnteringStandby -> Standby once drained
    activity_id: str | None = None  # the standby activity to complete with the transition
    terminated: bool = False


@dataclass
class _Activity:
    activity_id: str
    group_name: str
    description: str
    cause: str
    status_code: str
    progress: int
    start_time: datetime = field(default_factory=_now_utc)
    end_time: datetime | None = None

    @property
    def in_progress(self) -> bool:
        return self.status_code not in TERMINAL_ACTIVITY

    def finish(self, status: str = "Successful") -> None:
        self.status_code, self.progress, self.end_time = status, 100, _now_utc()

    def to_api(self, group_arn: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ActivityId": self.activity_id,
            "AutoScalingGroupName": self.group_name,
            "AutoScalingGroupARN": group_arn,
            "Description": self.description,
            "Cause": self.cause,
            "StartTime": self.start_time,
            "StatusCode": self.status_code,
            "Progress": self.progress,
            "Details": '{"Subnet ID":"subnet-local","Availability Zone":"us-east-1a"}',
        }
        if self.end_time is not None:
            out["EndTime"] = self.end_time
        return out


class _Sim:
    """AWS behaviour layered on moto's backends. Callers must hold `lock`."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.clear()

    def clear(self) -> None:
        self.health_seconds = 1.0
        self.pending_seconds = 0.3
        self.standby_lag = 0.0
        self.tg_delay: dict[str, float] = {}  # fractional deregistration delays by TG ARN
        self.elb_drain: dict[str, float] = {}  # fractional connection-draining timeouts by name
        self.groups: set[str] = set()  # adopted groups
        self.instances: dict[str, _SimInstance] = {}
        self.memberships: dict[str, dict[LbKey, _Membership]] = {}
        self.activities: list[_Activity] = []
        self.refreshes: dict[str, list[dict[str, Any]]] = {}
        self.lattice: dict[str, list[str]] = {}
        self.target_override: dict[str, tuple[str, str | None, str | None]] = {}
        self.elb_override: dict[str, str] = {}
        self.size_changes: list[tuple[str, int, int, str]] = []

    # -- moto access --------------------------------------------------------------------------

    @staticmethod
    def autoscaling() -> Any:
        return autoscaling_backends[ACCOUNT][REGION]

    def group(self, name: str) -> FakeAutoScalingGroup:
        group = self.autoscaling().autoscaling_groups.get(name)
        if group is None:
            raise ValidationError(f"AutoScalingGroup name not found - AutoScalingGroup '{name}' not found")
        assert isinstance(group, FakeAutoScalingGroup)
        return group

    def moto_state(self, instance_id: str) -> InstanceState | None:
        for group in self.autoscaling().autoscaling_groups.values():
            for state in group.instance_states:
                if state.instance.id == instance_id:
                    return state  # type: ignore[no-any-return]
        return None

    @staticmethod
    def lb_keys(group: FakeAutoScalingGroup) -> list[LbKey]:
        return [("tg", arn) for arn in group.target_group_arns] + [
            ("elb", n) for n in group.load_balancer_names
        ]

    @staticmethod
    def lb_exists(lb: LbKey) -> bool:
        kind, ident = lb
        if kind == "tg":
            return ident in elbv2_backends[ACCOUNT][REGION].target_groups
        return ident in elb_backends[ACCOUNT][REGION].load_balancers

    def manages(self, lb: LbKey) -> bool:
        """True if the sim answers health queries for this LB (else stock moto does)."""
        delays = self.tg_delay if lb[0] == "tg" else self.elb_drain
        return lb[1] in delays or any(lb in m for m in self.memberships.values())

    def delay(self, lb: LbKey) -> float:
        """Drain time for an LB: the sim's fractional value, else the real LB attribute."""
        kind, ident = lb
        if kind == "tg":
            if ident in self.tg_delay:
                return self.tg_delay[ident]
            tg = elbv2_backends[ACCOUNT][REGION].target_groups.get(ident)
            return float(str(tg.attributes.get("deregistration_delay.timeout_seconds", 300))) if tg else 0.0
        if ident in self.elb_drain:
            return self.elb_drain[ident]
        elb = elb_backends[ACCOUNT][REGION].load_balancers.get(ident)
        draining = elb.attributes.get("connection_draining", {}) if elb else {}
        return float(draining.get("timeout", 300)) if draining.get("enabled") else 0.0

    # -- time ---------------------------------------------------------------------------------

    def advance(self) -> None:
        """Adopt new groups/instances, then apply every transition that is due by now."""
        now = time.monotonic()
        for group in list(self.autoscaling().autoscaling_groups.values()):
            self._sync_group(group, now)
        for inst in self.instances.values():
            self._advance_instance(inst, now)

    def _sync_group(self, group: FakeAutoScalingGroup, now: float) -> None:
        # Instances present when a group is first seen count as long registered (healthy);
        # instances moto launches later (e.g. SetDesiredCapacity) start their health checks now.
        adopting = group.name not in self.groups
        self.groups.add(group.name)
        for state in group.instance_states:
            iid = state.instance.id
            if iid not in self.instances:
                self.instances[iid] = _SimInstance(iid, group.name)
            members = self.memberships.setdefault(iid, {})
            if state.lifecycle_state not in ("InService", "Pending"):
                continue
            for lb in self.lb_keys(group):
                if lb not in members:
                    members[lb] = _Membership(-math.inf if adopting else now)

    def _advance_instance(self, inst: _SimInstance, now: float) -> None:
        state = self.moto_state(inst.instance_id)
        if state is None:
            return
        if inst.pending_until is not None and now >= inst.pending_until:
            state.lifecycle_state = "InService"
            inst.pending_until = None
            self._finish_activity(inst)
        if inst.entering_since is not None and now >= self._standby_due(inst):
            state.lifecycle_state = "Standby"
            inst.entering_since = None
            self._finish_activity(inst)

    def _standby_due(self, inst: _SimInstance) -> float:
        # AWS keeps the instance in EnteringStandby until every LB has finished draining it.
        assert inst.entering_since is not None
        drains = [
            m.deregistered_at + self.delay(lb)
            for lb, m in self.memberships.get(inst.instance_id, {}).items()
            if m.deregistered_at is not None and self.lb_exists(lb)
        ]
        return max([inst.entering_since, *drains]) + self.standby_lag

    def _finish_activity(self, inst: _SimInstance) -> None:
        activity = self.find_activity(inst.activity_id) if inst.activity_id else None
        if activity is not None and activity.in_progress:
            activity.finish()
        inst.activity_id = None

    # -- activities ---------------------------------------------------------------------------

    def add_activity(
        self, group_name: str, description: str, cause: str, status: str, progress: int
    ) -> _Activity:
        activity = _Activity(str(uuid.uuid4()), group_name, description, cause, status, progress)
        self.activities.append(activity)
        return activity

    def find_activity(self, activity_id: str) -> _Activity | None:
        return next((a for a in self.activities if a.activity_id == activity_id), None)

    def describe_activities(self, group_name: str | None, ids: list[str]) -> list[dict[str, Any]]:
        selected = [
            a
            for a in self.activities
            if (not group_name or a.group_name == group_name) and (not ids or a.activity_id in ids)
        ]
        # AWS lists in-progress activities first, then newest first.
        selected.sort(key=lambda a: (not a.in_progress, -a.start_time.timestamp()))
        arns = {name: g.arn for name, g in self.autoscaling().autoscaling_groups.items()}
        return [a.to_api(arns.get(a.group_name, "")) for a in selected]

    # -- standby ------------------------------------------------------------------------------

    def _members_to_move(
        self, group: FakeAutoScalingGroup, instance_ids: list[str], required: str
    ) -> list[InstanceState]:
        if not instance_ids:
            raise ValidationError("The parameter InstanceIds must be specified.")
        if len(instance_ids) > 20:
            raise ValidationError("The number of instance IDs must be at most 20.")
        by_id = {s.instance.id: s for s in group.instance_states}
        states = []
        for iid in instance_ids:
            state = by_id.get(iid)
            if state is None:
                raise ValidationError(f"The instance {iid} is not part of Auto Scaling group {group.name}.")
            if state.lifecycle_state != required:
                raise ValidationError(f"The instance {iid} is not in {required}.")
            states.append(state)
        return states

    @staticmethod
    def _sizes_error(group: FakeAutoScalingGroup, verb: str, count: int) -> ValidationError:
        noun = "instance" if count == 1 else "instances"
        return ValidationError(
            f"AutoScalingGroup {group.name} has min-size={group.min_size}, max-size={group.max_size}, "
            f"and desired-size={group.desired_capacity}. To {verb} {count} {noun}, "
            "please update the AutoScalingGroup sizes appropriately."
        )

    def enter_standby(
        self, name: str, instance_ids: list[str], decrement: bool | None
    ) -> list[dict[str, Any]]:
        group = self.group(name)
        if not decrement:
            raise ValidationError(
                "local AWS: EnterStandby with ShouldDecrementDesiredCapacity=false is not simulated."
            )
        states = self._members_to_move(group, instance_ids, "InService")
        min_size, desired, _ = _sizes(group)
        if desired - len(states) < min_size:
            raise self._sizes_error(group, "place into standby", len(states))
        now = time.monotonic()
        activities = []
        for state in states:
            iid = state.instance.id
            old = _sizes(group)[1]
            group.desired_capacity = old - 1  # set directly: moto's setter would terminate an instance
            state.lifecycle_state = "EnteringStandby"
            for membership in self.memberships.get(iid, {}).values():
                if membership.deregistered_at is None:
                    membership.deregistered_at = now
            cause = (
                f"At {_now_utc():%Y-%m-%dT%H:%M:%SZ} instance {iid} was moved to standby in response to a "
                f"user request, shrinking the capacity from {old} to {old - 1}."
            )
            activity = self.add_activity(
                name, f"Moving EC2 instance to Standby: {iid}", cause, "InProgress", 50
            )
            inst = self.instances.setdefault(iid, _SimInstance(iid, name))
            inst.entering_since, inst.pending_until, inst.activity_id = now, None, activity.activity_id
            activities.append(activity.to_api(group.arn))
        return activities

    def exit_standby(self, name: str, instance_ids: list[str]) -> list[dict[str, Any]]:
        group = self.group(name)
        states = self._members_to_move(group, instance_ids, "Standby")
        if "Launch" in group._suspended_processes:
            # AWS: "you cannot return an instance in the Standby state to service" (wording is ours).
            raise ValidationError(f"local AWS: the Launch process is suspended for AutoScalingGroup {name}.")
        _, desired, max_size = _sizes(group)
        if desired + len(states) > max_size:
            raise self._sizes_error(group, "exit standby", len(states))  # AWS wording unconfirmed
        now = time.monotonic()
        activities = []
        for state in states:
            iid = state.instance.id
            old = _sizes(group)[1]
            group.desired_capacity = old + 1  # set directly: moto's setter would launch an instance
            state.lifecycle_state = "Pending"
            # The ASG registers the instance with its LBs before it becomes InService.
            self.memberships[iid] = {lb: _Membership(now) for lb in self.lb_keys(group)}
            cause = (
                f"At {_now_utc():%Y-%m-%dT%H:%M:%SZ} instance {iid} was moved out of standby in response "
                f"to a user request, increasing the capacity from {old} to {old + 1}."
            )
            activity = self.add_activity(
                name, f"Moving EC2 instance out of Standby: {iid}", cause, "PreInService", 30
            )
            inst = self.instances.setdefault(iid, _SimInstance(iid, name))
            inst.pending_until, inst.entering_since = now + self.pending_seconds, None
            inst.activity_id = activity.activity_id
            activities.append(activity.to_api(group.arn))
        return activities

    def update_sizes(
        self, group: FakeAutoScalingGroup, min_size: int | None, max_size: int | None, desired: int | None
    ) -> None:
        old_min, old, old_max = _sizes(group)
        new_min = old_min if min_size is None else min_size
        new_max = old_max if max_size is None else max_size
        if new_min > new_max:
            raise ValidationError(
                f"Max bound, {new_max}, must be greater than or equal to min bound, {new_min}"
            )
        if desired is not None and not new_min <= desired <= new_max:
            raise ValidationError(
                f"Desired capacity:{desired} must be between the specified "
                f"min size:{new_min} and max size:{new_max}"
            )
        new = desired if desired is not None else min(max(old, new_min), new_max)
        group.min_size, group.max_size, group.desired_capacity = new_min, new_max, new
        if new != old:
            # AWS would launch/terminate to match; the sim only records it.
            self.size_changes.append((group.name, old, new, "UpdateAutoScalingGroup"))

    # -- LB health ----------------------------------------------------------------------------

    def _membership(self, instance_id: str, lb: LbKey) -> _Membership | None:
        inst = self.instances.get(instance_id)
        if inst is not None and inst.terminated:
            return None
        return self.memberships.get(instance_id, {}).get(lb)

    def target_health(self, arn: str, instance_id: str, now: float) -> dict[str, str] | None:
        """TargetHealth of a registered/draining target; None once it is not registered."""
        lb: LbKey = ("tg", arn)
        m = self._membership(instance_id, lb)
        if m is None:
            return None
        if m.deregistered_at is not None:
            if now < m.deregistered_at + self.delay(lb):
                return _th(
                    "draining", "Target.DeregistrationInProgress", "Target deregistration is in progress"
                )
            return None
        if instance_id in self.target_override:
            return _th(*self.target_override[instance_id])
        if now < m.registered_at + self.health_seconds:
            return _th("initial", "Elb.RegistrationInProgress", "Target registration is in progress")
        return {"State": "healthy"}

    def unregistered_target_health(self, instance_id: str) -> dict[str, str]:
        inst = self.instances.get(instance_id)
        if inst is not None and inst.terminated:
            return _th("unused", "Target.InvalidState", "Target is in the stopped or terminated state")
        if ec2_backends[ACCOUNT][REGION].get_instance_by_id(instance_id) is None:
            raise InvalidTargetError()
        return _th("unused", "Target.NotRegistered", "Target is not registered to the target group")

    def elb_health(self, name: str, instance_id: str, now: float) -> tuple[str, str, str] | None:
        """(State, ReasonCode, Description) of a registered/draining instance; None once gone."""
        lb: LbKey = ("elb", name)
        m = self._membership(instance_id, lb)
        if m is None:
            return None
        if m.deregistered_at is not None:
            if now < m.deregistered_at + self.delay(lb):
                return ("InService", "N/A", "Instance deregistration currently in progress.")
            return None
        if instance_id in self.elb_override:
            failed = (
                "Instance has failed at least the UnhealthyThreshold number of health checks consecutively."
            )
            return (self.elb_override[instance_id], "Instance", failed)
        if now < m.registered_at + self.health_seconds:
            return ("OutOfService", "ELB", "Instance registration is still in progress.")
        return ("InService", "N/A", "N/A")

    def members_of(self, lb: LbKey) -> list[str]:
        return [iid for iid, members in self.memberships.items() if lb in members]


def _th(state: str, reason: str | None = None, description: str | None = None) -> dict[str, str]:
    health = {"State": state}
    if reason:
        health["Reason"] = reason
    if description:
        health["Description"] = description
    return health


# The single active simulation. moto's backends are process-global, so one LocalAWS per process.
_SIM: _Sim | None = None


# --------------------------------------------------------------------------------------------
# moto response patches
# --------------------------------------------------------------------------------------------

_ORIGINALS: dict[tuple[type, str], Callable[..., ActionResult]] = {}


def _patch(cls: type, name: str) -> Callable[[Callable[..., ActionResult]], Callable[..., ActionResult]]:
    """Replace `cls.name`; while no LocalAWS is running, the original (if any) still answers."""

    def decorate(handler: Callable[..., ActionResult]) -> Callable[..., ActionResult]:
        original: Callable[..., ActionResult] | None = getattr(cls, name, None)
        if original is not None:
            _ORIGINALS[(cls, name)] = original

        def method(self: BaseResponse) -> ActionResult:
            sim = _SIM
            if sim is None:
                if original is None:
                    raise NotImplementedError(name)
                return original(self)
            with sim.lock:
                sim.advance()
                return handler(self, sim)

        method.__name__ = name
        setattr(cls, name, method)
        return handler

    return decorate


def _traffic_sources(group: FakeAutoScalingGroup) -> list[dict[str, str]]:
    sources = [{"Identifier": arn, "Type": "elbv2"} for arn in group.target_group_arns]
    sources += [{"Identifier": name, "Type": "elb"} for name in group.load_balancer_names]
    if _SIM is not None:
        sources += [{"Identifier": arn, "Type": "vpc-lattice"} for arn in _SIM.lattice.get(group.name, [])]
    return sources


def _install_patches() -> None:
    """Install the moto patches once per process (idempotent)."""
    if getattr(FakeAutoScalingGroup, "traffic_sources", None) is not None:
        return  # already installed
    # moto serializes DescribeAutoScalingGroups from attributes; this adds TrafficSources.
    FakeAutoScalingGroup.traffic_sources = property(_traffic_sources)  # type: ignore[attr-defined]

    @_patch(AutoScalingResponse, "enter_standby")
    def enter_standby(self: AutoScalingResponse, sim: _Sim) -> ActionResult:
        activities = sim.enter_standby(
            self._get_param("AutoScalingGroupName"),
            self._get_param("InstanceIds", []),
            self._get_bool_param("ShouldDecrementDesiredCapacity"),
        )
        return ActionResult({"Activities": activities})

    @_patch(AutoScalingResponse, "exit_standby")
    def exit_standby(self: AutoScalingResponse, sim: _Sim) -> ActionResult:
        activities = sim.exit_standby(
            self._get_param("AutoScalingGroupName"), self._get_param("InstanceIds", [])
        )
        return ActionResult({"Activities": activities})

    @_patch(AutoScalingResponse, "update_auto_scaling_group")
    def update_auto_scaling_group(self: AutoScalingResponse, sim: _Sim) -> ActionResult:
        group = sim.group(self._get_param("AutoScalingGroupName"))
        # Sizes are ours (moto would launch/terminate); everything else goes to moto untouched.
        sim.update_sizes(
            group,
            self._get_int_param("MinSize"),
            self._get_int_param("MaxSize"),
            self._get_int_param("DesiredCapacity"),
        )
        group.update(
            availability_zones=self._get_param("AvailabilityZones", []),
            desired_capacity=None,
            max_size=None,
            min_size=None,
            launch_config_name=self._get_param("LaunchConfigurationName"),
            launch_template=self._get_param("LaunchTemplate", {}),
            vpc_zone_identifier=self._get_param("VPCZoneIdentifier"),
            health_check_period=self._get_int_param("HealthCheckGracePeriod"),
            health_check_type=self._get_param("HealthCheckType"),
            new_instances_protected_from_scale_in=self._get_bool_param(
                "NewInstancesProtectedFromScaleIn", None
            ),
            mixed_instances_policy=self._get_param("MixedInstancesPolicy") or group.mixed_instances_policy,
        )
        return ActionResult({})

    @_patch(AutoScalingResponse, "describe_auto_scaling_instances")
    def describe_auto_scaling_instances(self: AutoScalingResponse, sim: _Sim) -> ActionResult:
        wanted = self._get_param("InstanceIds", [])
        rows = []
        for group in sim.autoscaling().autoscaling_groups.values():
            for s in group.instance_states:
                if wanted and s.instance.id not in wanted:
                    continue
                rows.append(
                    {
                        "InstanceId": s.instance.id,
                        "InstanceType": s.instance_type,
                        "AutoScalingGroupName": group.name,
                        "AvailabilityZone": s.availability_zone,
                        "LifecycleState": s.lifecycle_state,
                        "HealthStatus": s.health_status.upper(),  # AWS: HEALTHY here, Healthy elsewhere
                        "ProtectedFromScaleIn": bool(s.protected_from_scale_in),
                        "LaunchTemplate": s.launch_template,
                    }
                )
        page, token = _page(rows, self._get_param("NextToken"), self._get_int_param("MaxRecords"), 50)
        return ActionResult({"AutoScalingInstances": page, "NextToken": token})

    @_patch(AutoScalingResponse, "describe_scaling_activities")
    def describe_scaling_activities(self: AutoScalingResponse, sim: _Sim) -> ActionResult:
        rows = sim.describe_activities(
            self._get_param("AutoScalingGroupName"), self._get_param("ActivityIds", [])
        )
        page, token = _page(rows, self._get_param("NextToken"), self._get_int_param("MaxRecords"), 100)
        return ActionResult({"Activities": page, "NextToken": token})

    @_patch(AutoScalingResponse, "describe_instance_refreshes")
    def describe_instance_refreshes(self: AutoScalingResponse, sim: _Sim) -> ActionResult:
        name = self._get_param("AutoScalingGroupName")
        sim.group(name)
        ids = self._get_param("InstanceRefreshIds", [])
        rows = [r for r in reversed(sim.refreshes.get(name, [])) if not ids or r["InstanceRefreshId"] in ids]
        page, token = _page(rows, self._get_param("NextToken"), self._get_int_param("MaxRecords"), 50)
        return ActionResult({"InstanceRefreshes": page, "NextToken": token})

    @_patch(AutoScalingResponse, "describe_traffic_sources")
    def describe_traffic_sources(self: AutoScalingResponse, sim: _Sim) -> ActionResult:
        group = sim.group(self._get_param("AutoScalingGroupName"))
        kind = self._get_param("TrafficSourceType")
        rows = [
            {"TrafficSource": s["Identifier"], "State": "InService", **s}
            for s in _traffic_sources(group)
            if not kind or s["Type"] == kind
        ]
        page, token = _page(rows, self._get_param("NextToken"), self._get_int_param("MaxRecords"), 50)
        return ActionResult({"TrafficSources": page, "NextToken": token})

    @_patch(ELBV2Response, "describe_target_health")
    def describe_target_health(self: ELBV2Response, sim: _Sim) -> ActionResult:
        arn = self._get_param("TargetGroupArn")
        tg = elbv2_backends[ACCOUNT][REGION].target_groups.get(arn)
        if tg is None:
            raise TargetGroupNotFoundError()
        if not sim.manages(("tg", arn)):
            return _ORIGINALS[(ELBV2Response, "describe_target_health")](self)
        now = time.monotonic()
        targets = self._get_param("Targets", [])
        ids = [t["Id"] for t in targets] if targets else sim.members_of(("tg", arn))
        rows = []
        for iid in ids:
            health = sim.target_health(arn, iid, now)
            if health is None:
                if not targets:
                    continue  # AWS omits unregistered targets from the full listing
                health = sim.unregistered_target_health(iid)
            rows.append(
                {
                    "Target": {"Id": iid, "Port": int(tg.port)},
                    "HealthCheckPort": str(tg.health_check_port or tg.port),
                    "TargetHealth": health,
                }
            )
        return ActionResult({"TargetHealthDescriptions": rows})

    @_patch(ELBResponse, "describe_instance_health")
    def describe_instance_health(self: ELBResponse, sim: _Sim) -> ActionResult:
        name = self._get_param("LoadBalancerName")
        if name not in elb_backends[ACCOUNT][REGION].load_balancers:
            raise ElbNotFound(name)
        if not sim.manages(("elb", name)):
            return _ORIGINALS[(ELBResponse, "describe_instance_health")](self)
        now = time.monotonic()
        asked = [i["InstanceId"] for i in self._get_param("Instances", [])]
        ec2 = ec2_backends[ACCOUNT][REGION]
        rows = []
        for iid in asked or sim.members_of(("elb", name)):
            inst = sim.instances.get(iid)
            if inst is not None and inst.terminated:
                continue  # AWS: terminated instances are not returned
            health = sim.elb_health(name, iid, now)
            if health is None:
                if not asked:
                    continue
                if ec2.get_instance_by_id(iid) is None:
                    raise ELBClientError("InvalidInstance", f"Could not find EC2 instance {iid}.")
                health = (
                    "OutOfService",
                    "N/A",
                    "Instance is not currently registered with the LoadBalancer.",
                )
            state, reason, description = health
            rows.append({"InstanceId": iid, "State": state, "ReasonCode": reason, "Description": description})
        return ActionResult({"InstanceStates": rows})


# --------------------------------------------------------------------------------------------
# WSGI gateway: call recorder, fault injection, one-request-at-a-time
# --------------------------------------------------------------------------------------------

_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([^/]+)/aws4_request")


@dataclass(frozen=True)
class Call:
    """One recorded API request. `fault` is the injected error code, if one was returned."""

    time: float  # time.monotonic()
    service: str  # SigV4 scope: "autoscaling", "elasticloadbalancing" (ELB and ELBv2 share it)...
    action: str
    params: dict[str, str]
    version: str = ""  # "2012-06-01" (classic ELB) vs "2015-12-01" (ELBv2)
    fault: str | None = None
    status: int = 0  # HTTP status answered: 200 means AWS did it

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class _Fault:
    code: str
    message: str
    status: int


@dataclass
class _OneShot:
    action: str
    fault: _Fault
    remaining: int


@dataclass
class _Throttle:
    rate: float
    actions: frozenset[str] | None
    fault: _Fault
    rng: random.Random


class _Gateway:
    """Wraps moto's WSGI app. Every AWS request is recorded, maybe faulted, then served under
    the sim lock so that requests are applied one at a time (as AWS does per group)."""

    def __init__(self, app: WsgiApp, sim: _Sim) -> None:
        self.app = app
        self.sim = sim
        self.lock = threading.Lock()  # guards calls and faults, never held while serving
        self.calls: list[Call] = []
        self.session_operations: set[str] = set()  # "service:Action" balanced.py called; never reset
        self.one_shots: list[_OneShot] = []
        self.throttle: _Throttle | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)  # moto reads the body again
        params = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        if "x-www-form-urlencoded" in environ.get("CONTENT_TYPE", ""):
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        action = params.get("Action")
        if not action or environ.get("HTTP_" + INTERNAL_HEADER.upper().replace("-", "_")):
            return self._serve(environ, start_response)[1]
        started = time.monotonic()
        with self.lock:
            fault = self._pick_fault(action)
        if fault is not None:
            status, body = fault.status, _error_response(start_response, fault)
        else:
            status, body = self._serve(environ, start_response)
        scope = _SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        call = Call(
            started,
            scope.group(1) if scope else "",
            action,
            params,
            params.get("Version", ""),
            fault.code if fault else None,
            status,
        )
        with self.lock:
            self.calls.append(call)
            if "balanced/" in environ.get("HTTP_USER_AGENT", ""):
                self.session_operations.add(f"{call.service}:{action}")
        return body

    def _serve(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> tuple[int, list[bytes]]:
        """moto's answer, computed under the sim lock (one request at a time, as AWS applies
        updates to a group), with the HTTP status it gave."""
        seen: list[int] = []

        def recording_start_response(status: str, headers: Any, *exc: Any) -> Any:
            seen.append(int(status.split()[0]))
            return start_response(status, headers, *exc)

        with self.sim.lock:
            self.sim.advance()
            body = list(self.app(environ, recording_start_response))  # materialize under the lock
        return (seen[0] if seen else 0), body

    def _pick_fault(self, action: str) -> _Fault | None:
        for shot in self.one_shots:
            if shot.action == action and shot.remaining > 0:
                shot.remaining -= 1
                return shot.fault
        t = self.throttle
        if t is not None and (t.actions is None or action in t.actions) and t.rng.random() < t.rate:
            return t.fault
        return None


def _error_response(start_response: Callable[..., Any], fault: _Fault) -> list[bytes]:
    """An AWS query-protocol (autoscaling, ELB, ELBv2) error document."""
    request_id = str(uuid.uuid4())
    kind = "Receiver" if fault.status >= 500 else "Sender"
    body = (
        "<ErrorResponse><Error>"
        f"<Type>{kind}</Type><Code>{escape(fault.code)}</Code><Message>{escape(fault.message)}</Message>"
        f"</Error><RequestId>{request_id}</RequestId></ErrorResponse>"
    ).encode()
    start_response(
        f"{fault.status} Error",
        [("Content-Type", "text/xml"), ("Content-Length", str(len(body))), ("x-amzn-RequestId", request_id)],
    )
    return [body]


class _QuietHandler(WSGIRequestHandler):
    """No per-request access log lines (they drown pytest output); errors still log."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class _GatewayMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer serving moto's app through our gateway. Overrides the private
    `_server_entry` (stable across moto 5.x; requirements pin moto < 5.3)."""

    def __init__(self, wrap: Callable[[WsgiApp], WsgiApp]) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self._wrap = wrap

    def _server_entry(self) -> None:
        app = self._wrap(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            self._ip_address, self._port, app, threaded=True, request_handler=_QuietHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    def stop(self) -> None:
        super().stop()
        if self._server is not None:
            self._server.server_close()  # release the listening socket; handler threads are daemons


# --------------------------------------------------------------------------------------------
# Public facade
# --------------------------------------------------------------------------------------------


class LocalAWS:
    """moto server + AWS-like standby/LB behaviour, controls and assertions for tests.

    Use as a context manager (or start()/stop()); only one may run per process."""

    def __init__(self) -> None:
        self._sim = _Sim()
        self._server: _GatewayMotoServer | None = None
        self._gateway: _Gateway | None = None
        self.endpoint = ""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> LocalAWS:
        global _SIM
        if _SIM is not None:
            raise RuntimeError("another LocalAWS is already running in this process")
        _install_patches()
        _SIM = self._sim

        def wrap(app: WsgiApp) -> WsgiApp:
            self._gateway = _Gateway(app, self._sim)
            return self._gateway

        self._server = _GatewayMotoServer(wrap)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        global _SIM
        if self._server is not None:
            self._server.stop()
            self._server = None
        if _SIM is self._sim:
            _SIM = None

    def __enter__(self) -> LocalAWS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Wipe moto state, sim state, recorded calls and faults (between tests)."""
        with self._sim.lock:
            moto_api_backend.reset()
            self._sim.clear()
        self.clear_calls()
        self.clear_faults()

    # -- clients ------------------------------------------------------------------------------

    def env(self, **extra: str | None) -> dict[str, str]:
        """Environment for a subprocess talking to this local AWS. Inherited AWS_* variables are
        dropped (no real profile/credentials can leak in); pass NAME=None to remove a variable."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_REGION=REGION,
            AWS_CONFIG_FILE="/dev/null",
            AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        )
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def client(self, service: str, max_attempts: int | None = None, internal: bool = False) -> Any:
        """A boto3 client for this endpoint. max_attempts: total attempts in standard retry mode
        (1 disables retries; None keeps botocore's defaults). internal=True:
        requests are neither recorded nor faulted (used for setup)."""
        config = (
            Config(retries={"mode": "standard", "total_max_attempts": max_attempts}) if max_attempts else None
        )
        client = boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=config,
        )
        if internal:
            client.meta.events.register("before-sign.*.*", _mark_internal)
        return client

    # -- building a group ---------------------------------------------------------------------

    def make_group(
        self,
        name: str = "web-asg",
        size: int = 3,
        min_size: int | None = None,
        max_size: int | None = None,
        target_groups: int = 1,
        classic_elbs: int = 0,
        deregistration_delay: float = 1.0,
        connection_draining: float = 1.0,
        health_seconds: float = 1.0,
        pending_seconds: float = 0.3,
    ) -> Group:
        """An ASG of `size` InService/Healthy instances behind `target_groups` ALB target groups
        and `classic_elbs` classic ELBs, all healthy. The timing knobs are global to the sim."""
        ec2, elbv2, elb, asg = (self.client(s, internal=True) for s in ("ec2", "elbv2", "elb", "autoscaling"))
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{az}")[
                "Subnet"
            ]["SubnetId"]
            for i, az in enumerate("ab")
        ]
        ec2.create_launch_template(
            LaunchTemplateName=f"{name}-lt",
            LaunchTemplateData={"ImageId": AMI_ID, "InstanceType": "t3.micro"},
        )
        tg_arns, tg_names = [], []
        for i in range(target_groups):
            tg_name = f"{name}-tg{i}"[:32]
            arn = elbv2.create_target_group(
                Name=tg_name,
                Protocol="HTTP",
                Port=80,
                VpcId=vpc,
                TargetType="instance",
                HealthCheckIntervalSeconds=5,
                HealthyThresholdCount=2,
            )["TargetGroups"][0]["TargetGroupArn"]
            alb = elbv2.create_load_balancer(Name=f"{name}-alb{i}"[:32], Subnets=subnets, Type="application")
            elbv2.create_listener(
                LoadBalancerArn=alb["LoadBalancers"][0]["LoadBalancerArn"],
                Protocol="HTTP",
                Port=80,
                DefaultActions=[{"Type": "forward", "TargetGroupArn": arn}],
            )
            tg_arns.append(arn)
            tg_names.append(tg_name)
        elb_names = [f"{name}-elb{j}"[:32] for j in range(classic_elbs)]
        for elb_name in elb_names:
            elb.create_load_balancer(
                LoadBalancerName=elb_name,
                Subnets=subnets,
                Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstancePort": 80}],
            )
        max_size = size + 2 if max_size is None else max_size
        asg.create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchTemplate={"LaunchTemplateName": f"{name}-lt", "Version": "$Default"},
            MinSize=size if min_size is None else min_size,
            MaxSize=max_size,
            DesiredCapacity=size,
            VPCZoneIdentifier=",".join(subnets),
            TargetGroupARNs=tg_arns,
            LoadBalancerNames=elb_names,
            HealthCheckType="ELB" if tg_arns or elb_names else "EC2",
            HealthCheckGracePeriod=300,
        )
        for arn in tg_arns:
            self.set_deregistration_delay(arn, deregistration_delay)
        for elb_name in elb_names:
            self.set_connection_draining(elb_name, connection_draining)
        with self._sim.lock:
            self._sim.health_seconds, self._sim.pending_seconds = health_seconds, pending_seconds
            self._sim.advance()  # adopt: every instance registered and healthy everywhere
            ids = [s.instance.id for s in self._sim.group(name).instance_states]
        return Group(name, ids, tg_arns, tg_names, elb_names)

    # -- knobs --------------------------------------------------------------------------------

    def set_deregistration_delay(self, tg_arn: str, seconds: float) -> None:
        """Sim drain time (fractional allowed); the real attribute gets ceil(seconds)."""
        self.client("elbv2", internal=True).modify_target_group_attributes(
            TargetGroupArn=tg_arn,
            Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": str(math.ceil(seconds))}],
        )
        with self._sim.lock:
            self._sim.tg_delay[tg_arn] = seconds

    def set_connection_draining(self, elb_name: str, seconds: float) -> None:
        """Classic ELB connection draining (0 disables); the real attribute gets ceil(seconds)."""
        draining = {"Enabled": seconds > 0, "Timeout": max(1, math.ceil(seconds))}
        self.client("elb", internal=True).modify_load_balancer_attributes(
            LoadBalancerName=elb_name, LoadBalancerAttributes={"ConnectionDraining": draining}
        )
        with self._sim.lock:
            self._sim.elb_drain[elb_name] = max(0.0, seconds)

    @property
    def health_seconds(self) -> float:
        return self._sim.health_seconds

    @health_seconds.setter
    def health_seconds(self, value: float) -> None:
        with self._sim.lock:
            self._sim.health_seconds = value

    @property
    def pending_seconds(self) -> float:
        return self._sim.pending_seconds

    @pending_seconds.setter
    def pending_seconds(self, value: float) -> None:
        with self._sim.lock:
            self._sim.pending_seconds = value

    @property
    def standby_lag(self) -> float:
        """Extra time between 'all drains done' and Standby."""
        return self._sim.standby_lag

    @standby_lag.setter
    def standby_lag(self, value: float) -> None:
        with self._sim.lock:
            self._sim.standby_lag = value

    # -- test controls ------------------------------------------------------------------------

    def start_activity(self, group: str, description: str = "Launching a new EC2 instance: i-x") -> str:
        """Inject an InProgress scaling activity; returns its ActivityId."""
        with self._sim.lock:
            self._sim.group(group)
            cause = f"At {_now_utc():%Y-%m-%dT%H:%M:%SZ} an activity was started by the test."
            return self._sim.add_activity(group, description, cause, "InProgress", 0).activity_id

    def finish_activity(self, activity_id: str, status: str = "Successful") -> None:
        with self._sim.lock:
            activity = self._sim.find_activity(activity_id)
            if activity is None:
                raise KeyError(activity_id)
            activity.finish(status)

    def start_instance_refresh(self, group: str, status: str = "InProgress") -> str:
        """Add an instance refresh (shown by DescribeInstanceRefreshes, newest first)."""
        refresh_id = str(uuid.uuid4())
        with self._sim.lock:
            self._sim.group(group)
            refresh: dict[str, Any] = {
                "InstanceRefreshId": refresh_id,
                "AutoScalingGroupName": group,
                "Status": status,
                "StatusReason": "",
                "StartTime": _now_utc(),
                "PercentageComplete": 0,
                "InstancesToUpdate": 1,
            }
            if status not in ACTIVE_REFRESH:
                refresh["EndTime"] = refresh["StartTime"]
            self._sim.refreshes.setdefault(group, []).append(refresh)
        return refresh_id

    def finish_instance_refresh(self, refresh_id: str, status: str = "Successful") -> None:
        with self._sim.lock:
            for refresh in (r for rs in self._sim.refreshes.values() for r in rs):
                if refresh["InstanceRefreshId"] == refresh_id:
                    refresh.update(Status=status, EndTime=_now_utc(), PercentageComplete=100)
                    return
        raise KeyError(refresh_id)

    def add_lattice_source(self, group: str, arn: str) -> None:
        """Attach a VPC Lattice traffic source (reported only, never health-checked)."""
        with self._sim.lock:
            self._sim.group(group)
            self._sim.lattice.setdefault(group, []).append(arn)

    def set_target_health(
        self,
        instance_id: str,
        state: str | None = "unhealthy",
        reason: str | None = "Target.FailedHealthChecks",
        description: str | None = "Health checks failed",
    ) -> None:
        """Sticky health override in all the instance's target groups while it is registered
        (draining/unused still win). state=None clears it."""
        with self._sim.lock:
            if state is None:
                self._sim.target_override.pop(instance_id, None)
            else:
                self._sim.target_override[instance_id] = (state, reason, description)

    def set_elb_health(self, instance_id: str, state: str | None = "OutOfService") -> None:
        """Sticky classic-ELB state override while registered; None clears it."""
        with self._sim.lock:
            if state is None:
                self._sim.elb_override.pop(instance_id, None)
            else:
                self._sim.elb_override[instance_id] = state

    def set_lifecycle(self, instance_id: str, state: str) -> None:
        """Force a LifecycleState; cancels the instance's pending transition (its activity stays
        in progress), so e.g. set_lifecycle(i, "EnteringStandby") makes it stick there."""
        with self._sim.lock:
            self._sim.advance()
            self._instance_state(instance_id).lifecycle_state = state
            inst = self._sim.instances[instance_id]
            inst.pending_until = inst.entering_since = None

    def set_health_status(self, instance_id: str, status: str) -> None:
        """ASG HealthStatus: "Healthy" / "Unhealthy"."""
        with self._sim.lock:
            self._instance_state(instance_id).health_status = status

    def terminate(self, instance_id: str) -> None:
        """The instance vanishes from its group (no replacement, desired unchanged); its targets
        read unused/Target.InvalidState and classic ELBs stop listing it."""
        with self._sim.lock:
            self._sim.advance()
            state = self._instance_state(instance_id)
            group = state.auto_scaling_group
            group.instance_states = [s for s in group.instance_states if s is not state]
            # Bypass ec2's terminate_instances: it would make moto launch a replacement.
            state.instance._state.name, state.instance._state.code = "terminated", 48
            self._sim.instances[instance_id].terminated = True

    def detach_target_group(self, group: str, tg_arn: str) -> None:
        """Detach a TG from the group: its targets drain, then are unregistered."""
        with self._sim.lock:
            self._sim.advance()
            g = self._sim.group(group)
            g.target_group_arns = [a for a in g.target_group_arns if a != tg_arn]
            now = time.monotonic()
            for members in self._sim.memberships.values():
                m = members.get(("tg", tg_arn))
                if m is not None and m.deregistered_at is None:
                    m.deregistered_at = now

    def delete_target_group(self, tg_arn: str) -> None:
        """Make a TG vanish (TargetGroupNotFound) while groups still reference it."""
        with self._sim.lock:
            elbv2_backends[ACCOUNT][REGION].target_groups.pop(tg_arn, None)

    # -- assertions ---------------------------------------------------------------------------

    def lifecycle(self, instance_id: str) -> str | None:
        """Current LifecycleState, or None if the instance is in no group."""
        with self._sim.lock:
            self._sim.advance()
            state = self._sim.moto_state(instance_id)
            return state.lifecycle_state if state else None

    def target_state(self, instance_id: str, tg_arn: str) -> str:
        """TargetHealth.State as DescribeTargetHealth(Targets=[id]) would report it."""
        with self._sim.lock:
            self._sim.advance()
            health = self._sim.target_health(tg_arn, instance_id, time.monotonic())
            return health["State"] if health else "unused"

    def elb_state(self, instance_id: str, elb_name: str) -> tuple[str, str]:
        """(State, Description) as DescribeInstanceHealth(Instances=[id]) would report it."""
        with self._sim.lock:
            self._sim.advance()
            health = self._sim.elb_health(elb_name, instance_id, time.monotonic())
            if health is None:
                return ("OutOfService", "Instance is not currently registered with the LoadBalancer.")
            return (health[0], health[2])

    def fleet_snapshot(self, group: str) -> dict[str, Member]:
        """Every instance of the group at one instant (under the sim lock): what a monitor
        needs to check a disruption budget strictly."""
        with self._sim.lock:
            self._sim.advance()
            now = time.monotonic()
            g = self._sim.group(group)
            result = {}
            for state in g.instance_states:
                iid = state.instance.id
                in_lbs = [
                    self._sim.target_health(ident, iid, now) == {"State": "healthy"}
                    if kind == "tg"
                    else self._sim.elb_health(ident, iid, now) == ("InService", "N/A", "N/A")
                    for kind, ident in self._sim.lb_keys(g)
                ]
                serving = (
                    state.lifecycle_state == "InService"
                    and state.health_status.lower() == "healthy"
                    and all(in_lbs)
                )
                result[iid] = Member(iid, state.lifecycle_state, serving)
            return result

    def group_sizes(self, group: str) -> tuple[int, int, int]:
        """(MinSize, DesiredCapacity, MaxSize)."""
        with self._sim.lock:
            return _sizes(self._sim.group(group))

    def group_tags(self, group: str) -> dict[str, str]:
        with self._sim.lock:
            return {t["Key"]: t["Value"] for t in self._sim.group(group).tags}

    @property
    def size_changes(self) -> list[tuple[str, int, int, str]]:
        """(group, old desired, new desired, cause) for desired changes AWS would act on."""
        with self._sim.lock:
            return list(self._sim.size_changes)

    def _instance_state(self, instance_id: str) -> InstanceState:
        state = self._sim.moto_state(instance_id)
        if state is None:
            raise KeyError(f"{instance_id} is in no Auto Scaling group")
        return state

    # -- call recorder and faults -------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        gateway = self._require_gateway()
        with gateway.lock:
            return list(gateway.calls)

    @property
    def session_operations(self) -> set[str]:
        """Every "service:Action" that balanced.py (told apart by its user agent) called since
        the server started, across resets: what its IAM policy must allow."""
        gateway = self._require_gateway()
        with gateway.lock:
            return set(gateway.session_operations)

    def calls_of(self, action: str) -> list[Call]:
        return [c for c in self.calls if c.action == action]

    def clear_calls(self) -> None:
        gateway = self._require_gateway()
        with gateway.lock:
            gateway.calls.clear()

    def fail_next(
        self,
        action: str,
        code: str = "Throttling",
        message: str = "Rate exceeded",
        status: int = 400,
        count: int = 1,
    ) -> None:
        """Answer the next `count` calls of `action` with an AWS error instead of serving them."""
        gateway = self._require_gateway()
        with gateway.lock:
            gateway.one_shots.append(_OneShot(action, _Fault(code, message, status), count))

    def throttle(
        self,
        rate: float,
        actions: Iterable[str] | None = None,
        code: str = "Throttling",
        status: int = 400,
        seed: int | None = 0,
        message: str = "Rate exceeded",
    ) -> None:
        """Fail a random fraction `rate` of calls (of `actions`, default all) until clear_faults()."""
        gateway = self._require_gateway()
        with gateway.lock:
            gateway.throttle = _Throttle(
                rate,
                frozenset(actions) if actions is not None else None,
                _Fault(code, message, status),
                random.Random(seed),
            )

    def clear_faults(self) -> None:
        gateway = self._require_gateway()
        with gateway.lock:
            gateway.one_shots.clear()
            gateway.throttle = None

    def _require_gateway(self) -> _Gateway:
        if self._gateway is None:
            raise RuntimeError("LocalAWS is not started")
        return self._gateway


def _mark_internal(request: Any, **_: Any) -> None:
    request.headers[INTERNAL_HEADER] = "1"
