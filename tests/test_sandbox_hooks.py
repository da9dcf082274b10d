"""The lifecycle-hook emulator behaves like AWS, seen through real boto3 clients on moto.

Everything is asserted through ``boto3.client("autoscaling")`` calls (the guard's view) and the
emulator's history. The event fixture ``fixtures/aws_event_ec2_instance_terminate_lifecycle_action.json``
is the "EC2 Instance-terminate Lifecycle Action" sample of the Amazon EC2 Auto Scaling user guide's
event reference, with the ``Origin``/``Destination`` pair the current page carries; the warm-pool one
is that guide's "returns an instance to the warm pool" example, verbatim.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ParamValidationError
from conftest import REGION

from busy_guard.sandbox import CONTINUE, TERMINATING, LifecycleHookEmulator, ManualClock, ScaledClock

FIXTURES = Path(__file__).parent / "fixtures"
GROUP = "workers"
HOOK = "busy-guard"
AMI = "ami-12c6146b"  # one of moto's default AMIs
START = 1_800_000_000.0
# One session for the module: its loader parses the (large) service models once, not once per test.
SESSION = boto3.session.Session()


def new_client(service: str, **kwargs: Any) -> Any:
    return SESSION.client(service, region_name=REGION, **kwargs)  # type: ignore[call-overload]


@dataclass
class Sandbox:
    operator: Any  # attached autoscaling client used to set things up
    guard: Any  # another attached client, like the one the guard Lambda creates
    ec2: Any
    emu: LifecycleHookEmulator
    clock: ManualClock

    def add_hook(
        self, name: str = HOOK, *, timeout: int = 900, default: str = CONTINUE, metadata: str | None = None
    ) -> None:
        kwargs: dict[str, Any] = {}
        if metadata is not None:
            kwargs["NotificationMetadata"] = metadata
        self.operator.put_lifecycle_hook(
            AutoScalingGroupName=GROUP,
            LifecycleHookName=name,
            LifecycleTransition=TERMINATING,
            HeartbeatTimeout=timeout,
            DefaultResult=default,
            **kwargs,
        )

    def group(self) -> dict[str, Any]:
        groups: list[dict[str, Any]] = self.guard.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])[
            "AutoScalingGroups"
        ]
        return groups[0]

    def instances(self) -> dict[str, str]:
        """Instance id -> LifecycleState, as DescribeAutoScalingGroups reports them."""
        return {i["InstanceId"]: i["LifecycleState"] for i in self.group()["Instances"]}

    def ec2_state(self, instance_id: str) -> str:
        reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        state: str = reservations[0]["Instances"][0]["State"]["Name"]
        return state

    def complete(self, instance_id: str, result: str = CONTINUE, hook: str = HOOK) -> dict[str, Any]:
        response: dict[str, Any] = self.guard.complete_lifecycle_action(
            AutoScalingGroupName=GROUP,
            LifecycleHookName=hook,
            InstanceId=instance_id,
            LifecycleActionResult=result,
        )
        return response

    def heartbeat(self, instance_id: str, hook: str = HOOK) -> dict[str, Any]:
        response: dict[str, Any] = self.guard.record_lifecycle_action_heartbeat(
            AutoScalingGroupName=GROUP, LifecycleHookName=hook, InstanceId=instance_id
        )
        return response


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch, aws: None) -> Sandbox:
    # moto builds ~2,600 default AMIs per EC2 backend; the tests don't need them (AMI is one of them).
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    ec2 = new_client("ec2")
    ec2.create_launch_template(
        LaunchTemplateName="workers-template", LaunchTemplateData={"ImageId": AMI, "InstanceType": "t3.micro"}
    )
    clock = ManualClock(START)
    emu = LifecycleHookEmulator(new_client("autoscaling"), clock=clock, ec2=ec2)
    operator = emu.attach(new_client("autoscaling"))
    operator.create_auto_scaling_group(
        AutoScalingGroupName=GROUP,
        LaunchTemplate={"LaunchTemplateName": "workers-template", "Version": "$Latest"},
        MinSize=0,
        MaxSize=6,
        DesiredCapacity=3,
        AvailabilityZones=[f"{REGION}a"],
    )
    guard = emu.attach(new_client("autoscaling"))
    return Sandbox(operator=operator, guard=guard, ec2=ec2, emu=emu, clock=clock)


def first_instance(sb: Sandbox) -> str:
    return sorted(sb.instances())[0]


def error_of(excinfo: pytest.ExceptionInfo[ClientError]) -> tuple[str, str, int]:
    response: Any = excinfo.value.response
    return (
        response["Error"]["Code"],
        response["Error"]["Message"],
        response["ResponseMetadata"]["HTTPStatusCode"],
    )


# --- the main path ------------------------------------------------------------------------------
def test_terminate_wait_heartbeat_complete_leaves_the_group(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook(timeout=900)
    victim = first_instance(sb)
    others = set(sb.instances()) - {victim}

    events = sb.emu.terminate(victim)

    assert len(events) == 1
    assert sb.instances()[victim] == "Terminating:Wait"
    assert all(sb.instances()[i] == "InService" for i in others)
    rows = sb.guard.describe_auto_scaling_instances(InstanceIds=[victim])["AutoScalingInstances"]
    assert rows[0]["LifecycleState"] == "Terminating:Wait"
    assert sb.emu.state(victim) == "Terminating:Wait"
    (action,) = sb.emu.actions(victim)
    assert action.heartbeat_deadline == START + 900
    assert action.global_deadline == START + 90_000

    sb.clock.advance(600)
    sb.heartbeat(victim)
    assert sb.emu.actions(victim)[0].heartbeat_deadline == START + 600 + 900  # the full timeout again
    sb.clock.advance(800)  # past the first deadline, inside the extended one
    assert sb.instances()[victim] == "Terminating:Wait"

    response = sb.complete(victim)

    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    group = sb.group()
    assert set(sb.instances()) == others  # gone, and no replacement launched
    assert group["DesiredCapacity"] == 2
    assert sb.ec2_state(victim) == "terminated"
    assert sb.emu.state(victim) == "Terminated"
    (completion,) = sb.emu.completions(victim)
    assert (completion.result, completion.by, completion.hook_name) == ("CONTINUE", "guard", HOOK)
    assert completion.at == START + 1400
    assert completion.wait_seconds == 1400
    assert sb.emu.heartbeats(victim) == 1
    assert [e.what for e in sb.emu.timeline()] == ["terminate", "heartbeat", "complete", "terminated"]


def test_completing_twice_is_the_aws_validation_error(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook()
    victim = first_instance(sb)
    sb.emu.terminate(victim)
    sb.complete(victim)

    with pytest.raises(ClientError) as excinfo:
        sb.complete(victim)

    assert error_of(excinfo) == (
        "ValidationError",
        f"No active Lifecycle Action found with instance ID {victim}",
        400,
    )
    assert excinfo.value.operation_name == "CompleteLifecycleAction"
    with pytest.raises(ClientError) as heartbeat_error:
        sb.heartbeat(victim)
    assert error_of(heartbeat_error)[:2] == (
        "ValidationError",
        f"No active Lifecycle Action found with instance ID {victim}",
    )
    stats = sb.emu.calls("CompleteLifecycleAction")
    assert (stats.attempted, stats.accepted, stats.rejected) == (2, 1, 1)
    assert len(sb.emu.completions(victim, by="guard")) == 1


def test_token_or_instance_id_select_the_action(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook()
    victim, other = sorted(sb.instances())[:2]
    (event,) = sb.emu.terminate(victim)
    token = event["detail"]["LifecycleActionToken"]
    sb.emu.terminate(other)

    sb.guard.record_lifecycle_action_heartbeat(
        AutoScalingGroupName=GROUP, LifecycleHookName=HOOK, LifecycleActionToken=token
    )
    wrong = str(uuid.uuid4())
    with pytest.raises(ClientError) as excinfo:
        sb.guard.complete_lifecycle_action(
            AutoScalingGroupName=GROUP,
            LifecycleHookName=HOOK,
            LifecycleActionToken=wrong,
            LifecycleActionResult="CONTINUE",
        )
    assert error_of(excinfo)[:2] == (
        "ValidationError",
        f"No active Lifecycle Action found with token {wrong}",
    )
    with pytest.raises(ClientError):  # the token of one instance with the id of another
        sb.guard.complete_lifecycle_action(
            AutoScalingGroupName=GROUP,
            LifecycleHookName=HOOK,
            LifecycleActionToken=token,
            InstanceId=other,
            LifecycleActionResult="CONTINUE",
        )

    sb.guard.complete_lifecycle_action(
        AutoScalingGroupName=GROUP,
        LifecycleHookName=HOOK,
        LifecycleActionToken=token,
        LifecycleActionResult="CONTINUE",
    )

    assert sb.emu.state(victim) == "Terminated"
    assert sb.emu.state(other) == "Terminating:Wait"
    assert sb.emu.heartbeats(victim) == 1
    assert sb.emu.completions(victim)[0].token == token


def test_requests_are_validated_like_aws(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook()
    victim = first_instance(sb)
    sb.emu.terminate(victim)

    with pytest.raises(ClientError) as bad_result:
        sb.complete(victim, result="MAYBE")
    assert error_of(bad_result)[0] == "ValidationError"
    assert "CONTINUE or ABANDON" in error_of(bad_result)[1]

    with pytest.raises(ClientError) as neither:
        sb.guard.complete_lifecycle_action(
            AutoScalingGroupName=GROUP, LifecycleHookName=HOOK, LifecycleActionResult="CONTINUE"
        )
    assert error_of(neither)[0] == "ValidationError"

    with pytest.raises(ClientError) as wrong_hook:
        sb.complete(victim, hook="someone-elses-hook")
    assert error_of(wrong_hook)[1] == f"No active Lifecycle Action found with instance ID {victim}"

    with pytest.raises(ClientError) as no_group:
        sb.guard.complete_lifecycle_action(
            AutoScalingGroupName="nope",
            LifecycleHookName=HOOK,
            InstanceId=victim,
            LifecycleActionResult="CONTINUE",
        )
    assert error_of(no_group)[0] == "ValidationError"
    assert "nope" in error_of(no_group)[1]

    with pytest.raises(ParamValidationError):  # required by the API model: botocore refuses to send it
        sb.guard.complete_lifecycle_action(
            AutoScalingGroupName=GROUP, InstanceId=victim, LifecycleActionResult="CONTINUE"
        )

    assert sb.emu.state(victim) == "Terminating:Wait"  # nothing above touched the action
    assert sb.emu.calls("CompleteLifecycleAction").rejected == 4


# --- timeouts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("default", ["CONTINUE", "ABANDON"])
def test_heartbeat_timeout_applies_the_default_result(sandbox: Sandbox, default: str) -> None:
    sb = sandbox
    sb.add_hook(timeout=900, default=default)
    victim = first_instance(sb)
    sb.emu.terminate(victim)

    sb.clock.advance(899)
    assert sb.emu.apply_timeouts() == []
    assert sb.instances()[victim] == "Terminating:Wait"
    sb.clock.advance(2)  # no explicit apply_timeouts: the next call through the client sees it

    assert victim not in sb.instances()
    assert sb.ec2_state(victim) == "terminated"  # both results terminate for a terminating hook
    (completion,) = sb.emu.completions(victim)
    assert (completion.result, completion.by, completion.detail) == (default, "timeout", "heartbeat timeout")
    assert completion.at == START + 900
    with pytest.raises(ClientError) as excinfo:
        sb.heartbeat(victim)
    assert error_of(excinfo)[0] == "ValidationError"


def test_global_timeout_ends_the_wait_despite_heartbeats(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook(timeout=30)  # global timeout: 100 x 30 s = 3000 s
    victim = first_instance(sb)
    sb.emu.terminate(victim)

    beats = 0
    while sb.clock.advance(25) < START + 3000:
        sb.heartbeat(victim)
        beats += 1
        (action,) = sb.emu.actions(victim)
        assert action.heartbeat_deadline == min(sb.clock() + 30, START + 3000)  # never past the global one

    assert sb.emu.state(victim) == "Terminated"
    (completion,) = sb.emu.completions(victim)
    assert (completion.by, completion.detail, completion.at) == ("timeout", "global timeout", START + 3000)
    assert sb.emu.heartbeats(victim) == beats == 119


def test_apply_timeouts_reports_what_ended(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook(timeout=60, default="ABANDON")
    a, b = sorted(sb.instances())[:2]
    sb.emu.terminate(a)
    sb.clock.advance(30)
    sb.emu.terminate(b)
    sb.clock.advance(40)

    ended = sb.emu.apply_timeouts()

    assert [(c.instance_id, c.result, c.at) for c in ended] == [(a, "ABANDON", START + 60)]
    assert sb.emu.state(b) == "Terminating:Wait"


def test_timeouts_due_together_apply_in_deadline_order(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook(timeout=60)
    a, b = sorted(sb.instances())[:2]
    sb.emu.terminate(a)
    sb.clock.advance(10)
    sb.emu.terminate(b)  # deadline +70
    sb.clock.advance(10)
    sb.heartbeat(a)  # deadline +80
    sb.clock.advance(80)

    ended = sb.emu.apply_timeouts()

    assert [(c.instance_id, c.at) for c in ended] == [(b, START + 70), (a, START + 80)]
    assert [e.instance_id for e in sb.emu.timeline() if e.what == "timeout"] == [b, a]


def test_clocks() -> None:
    manual = ManualClock(100.0)
    assert manual.advance(5) == manual() == 105.0
    with pytest.raises(ValueError):
        manual.advance(-1)
    scaled = ScaledClock(factor=1000.0, start=0.0)
    first = scaled()
    time.sleep(0.01)
    assert scaled() - first >= 10.0  # 10 ms of real time is at least 10 s of sandbox time


# --- several hooks, ABANDON ----------------------------------------------------------------------
def test_two_hooks_both_must_complete(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook("first")
    sb.add_hook("second")
    victim = first_instance(sb)

    events = sb.emu.terminate(victim)

    assert sorted(e["detail"]["LifecycleHookName"] for e in events) == ["first", "second"]
    assert len({e["detail"]["LifecycleActionToken"] for e in events}) == 2
    sb.complete(victim, hook="first")
    assert sb.instances()[victim] == "Terminating:Wait"  # the other hook still waits
    with pytest.raises(ClientError):
        sb.complete(victim, hook="first")
    sb.complete(victim, hook="second")
    assert victim not in sb.instances()
    assert [c.hook_name for c in sb.emu.completions(victim)] == ["first", "second"]


def test_abandon_ends_the_termination_and_skips_other_hooks(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook("first")
    sb.add_hook("second")
    victim = first_instance(sb)
    sb.emu.terminate(victim)

    sb.complete(victim, result="ABANDON", hook="first")

    assert victim not in sb.instances()
    assert sb.ec2_state(victim) == "terminated"
    with pytest.raises(ClientError) as excinfo:
        sb.complete(victim, hook="second")
    assert error_of(excinfo)[1] == f"No active Lifecycle Action found with instance ID {victim}"
    assert [(c.hook_name, c.result) for c in sb.emu.completions(victim)] == [("first", "ABANDON")]
    assert "skipped" in [e.what for e in sb.emu.timeline()]


def test_no_terminating_hook_terminates_at_once(sandbox: Sandbox) -> None:
    sb = sandbox
    victim = first_instance(sb)

    assert sb.emu.terminate(victim) == []

    assert victim not in sb.instances()
    assert sb.emu.state(victim) == "Terminated"


def test_without_decrement_moto_launches_a_replacement(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook()
    victim = first_instance(sb)
    sb.emu.terminate(victim, should_decrement=False)
    sb.complete(victim)

    assert victim not in sb.instances()
    assert len(sb.instances()) == 3
    assert sb.group()["DesiredCapacity"] == 3


# --- warm pool ----------------------------------------------------------------------------------
def test_warm_pool_return_keeps_the_instance_and_relaunch_brings_it_back(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.operator.put_warm_pool(AutoScalingGroupName=GROUP, PoolState="Stopped")
    sb.add_hook()
    victim = first_instance(sb)

    (event,) = sb.emu.terminate(victim, destination="WarmPool")

    assert (event["detail"]["Origin"], event["detail"]["Destination"]) == ("AutoScalingGroup", "WarmPool")
    assert sb.instances()[victim] == "Warmed:Pending:Wait"  # AWS's wait state for a return to the pool
    waiting = sb.guard.describe_warm_pool(AutoScalingGroupName=GROUP)["Instances"]
    assert [(i["InstanceId"], i["LifecycleState"]) for i in waiting] == [(victim, "Warmed:Pending:Wait")]
    sb.complete(victim)

    assert victim not in sb.instances()
    assert sb.emu.state(victim) == "Warmed:Stopped"
    assert sb.ec2_state(victim) == "stopped"
    pool = sb.guard.describe_warm_pool(AutoScalingGroupName=GROUP)
    assert [(i["InstanceId"], i["LifecycleState"]) for i in pool["Instances"]] == [(victim, "Warmed:Stopped")]
    rows = sb.guard.describe_auto_scaling_instances(InstanceIds=[victim])["AutoScalingInstances"]
    assert rows[0]["LifecycleState"] == "Warmed:Stopped"

    sb.emu.relaunch(victim)

    assert sb.instances()[victim] == "InService"
    assert sb.ec2_state(victim) == "running"
    assert sb.emu.state(victim) == "InService"
    assert sb.guard.describe_warm_pool(AutoScalingGroupName=GROUP)["Instances"] == []
    (again,) = sb.emu.terminate(victim)  # a second termination is a fresh wait with a fresh token
    assert again["detail"]["LifecycleActionToken"] != event["detail"]["LifecycleActionToken"]
    assert sb.instances()[victim] == "Terminating:Wait"


# --- the event ----------------------------------------------------------------------------------
def terminate_event_samples() -> list[Path]:
    """Our copy of the documented sample, plus any other terminate-event fixture the repo has."""
    paths = sorted(FIXTURES.rglob("*.json"))
    return [
        p
        for p in paths
        if json.loads(p.read_text()).get("detail-type") == "EC2 Instance-terminate Lifecycle Action"
    ]


@pytest.mark.parametrize("sample_path", terminate_event_samples(), ids=lambda p: p.name)
def test_event_has_the_documented_shape(sandbox: Sandbox, sample_path: Path) -> None:
    sb = sandbox
    sample = json.loads(sample_path.read_text())
    sb.add_hook(metadata="additional-info")
    victim = first_instance(sb)
    received: list[dict[str, Any]] = []
    sb.emu.on_event = received.append  # the same events, pushed as they happen

    (event,) = sb.emu.terminate(victim, destination=sample["detail"]["Destination"])

    assert received == [event] == sb.emu.events()
    assert set(event) == set(sample)
    assert set(event["detail"]) == set(sample["detail"])
    for key in ("version", "detail-type", "source"):
        assert event[key] == sample[key]
    for key in ("LifecycleTransition", "Origin", "Destination", "NotificationMetadata"):
        assert event["detail"][key] == sample["detail"][key]
    assert uuid.UUID(event["id"])
    assert uuid.UUID(event["detail"]["LifecycleActionToken"])
    assert event["time"] == "2027-01-15T08:00:00Z"  # START, from the injected clock
    assert (event["account"], event["region"]) == ("123456789012", REGION)
    (arn,) = event["resources"]
    assert arn == sb.group()["AutoScalingGroupARN"]
    assert re.fullmatch(
        rf"arn:aws:autoscaling:{REGION}:123456789012:autoScalingGroup:[-0-9a-f]+:autoScalingGroupName/{GROUP}",
        arn,
    )
    assert event["detail"]["AutoScalingGroupName"] == GROUP
    assert event["detail"]["LifecycleHookName"] == HOOK
    assert event["detail"]["EC2InstanceId"] == victim


def test_event_leaves_out_what_the_hook_and_caller_do_not_have(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook()  # no NotificationMetadata
    (event,) = sb.emu.terminate(first_instance(sb), origin=None, destination=None)
    assert set(event["detail"]) == {
        "LifecycleActionToken",
        "AutoScalingGroupName",
        "LifecycleHookName",
        "EC2InstanceId",
        "LifecycleTransition",
    }


def test_describe_lifecycle_hooks_reports_metadata_and_global_timeout(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook("short", timeout=900, metadata="meta")
    sb.add_hook("long", timeout=7200)
    hooks = {
        h["LifecycleHookName"]: h
        for h in sb.guard.describe_lifecycle_hooks(AutoScalingGroupName=GROUP)["LifecycleHooks"]
    }
    assert hooks["short"]["GlobalTimeout"] == 90_000
    assert hooks["short"]["NotificationMetadata"] == "meta"
    assert hooks["long"]["GlobalTimeout"] == 172_800
    assert "NotificationMetadata" not in hooks["long"]


# --- faults, retries, concurrency ---------------------------------------------------------------
def test_injected_5xx_is_retried_by_botocore(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook()
    victim = first_instance(sb)
    sb.emu.terminate(victim)
    client = sb.emu.attach(
        new_client(
            "autoscaling",
            config=Config(retries={"mode": "standard", "total_max_attempts": 3}),
        )
    )
    sb.emu.fail_next("CompleteLifecycleAction", "ResourceContention", count=2)

    response = client.complete_lifecycle_action(
        AutoScalingGroupName=GROUP,
        LifecycleHookName=HOOK,
        InstanceId=victim,
        LifecycleActionResult="CONTINUE",
    )

    assert response["ResponseMetadata"]["RetryAttempts"] == 2
    stats = sb.emu.calls("CompleteLifecycleAction")
    assert (stats.attempted, stats.faulted, stats.accepted) == (3, 2, 1)
    assert len(sb.emu.completions(victim)) == 1


def test_a_fault_aimed_at_one_client_never_hits_another(sandbox: Sandbox) -> None:
    """A test's own reads (the operator client) must not consume or see the faults meant for the
    code under test (the guard client), whichever of them calls first."""
    sb = sandbox
    sb.add_hook()
    sb.emu.fail_next("DescribeAutoScalingGroups", "AccessDenied", count=1, client=sb.guard)  # no retry

    listed = sb.operator.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])
    with pytest.raises(ClientError) as denied:
        sb.guard.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])

    assert listed["AutoScalingGroups"][0]["AutoScalingGroupName"] == GROUP
    assert error_of(denied)[0] == "AccessDenied"
    stats = sb.emu.calls("DescribeAutoScalingGroups")
    assert stats.faulted == 1
    sb.guard.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])  # the fault is used up
    with pytest.raises(ValueError, match="attached"):
        sb.emu.fail_next("DescribeAutoScalingGroups", client=new_client("autoscaling"))


def test_injected_faults_surface_as_client_errors(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook()
    victim = first_instance(sb)
    sb.emu.terminate(victim)
    client = sb.emu.attach(
        new_client(
            "autoscaling",
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
        )
    )
    sb.emu.fail_next("RecordLifecycleActionHeartbeat", "Throttling")
    sb.emu.fail_next("DescribeAutoScalingGroups", "AccessDenied")

    with pytest.raises(ClientError) as throttled:
        client.record_lifecycle_action_heartbeat(
            AutoScalingGroupName=GROUP, LifecycleHookName=HOOK, InstanceId=victim
        )
    with pytest.raises(ClientError) as denied:
        client.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])

    assert error_of(throttled) == ("Throttling", "Rate exceeded", 400)
    assert error_of(denied)[0::2] == ("AccessDenied", 403)
    assert sb.emu.heartbeats(victim) == 0
    client.record_lifecycle_action_heartbeat(
        AutoScalingGroupName=GROUP, LifecycleHookName=HOOK, InstanceId=victim
    )
    assert client.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"]
    assert sb.emu.heartbeats(victim) == 1


def test_concurrent_completions_accept_exactly_one(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook()
    victim = first_instance(sb)
    sb.emu.terminate(victim)
    clients = [sb.emu.attach(new_client("autoscaling")) for _ in range(6)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(clients))

    def complete(client: Any) -> None:
        barrier.wait()
        try:
            client.complete_lifecycle_action(
                AutoScalingGroupName=GROUP,
                LifecycleHookName=HOOK,
                InstanceId=victim,
                LifecycleActionResult="CONTINUE",
            )
            outcomes.append("ok")
        except ClientError as error:
            outcomes.append(error.response["Error"]["Code"])

    threads = [threading.Thread(target=complete, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["ValidationError"] * 5 + ["ok"]
    assert len(sb.emu.completions(victim)) == 1
    assert victim not in sb.instances()


def test_detached_client_reaches_moto_again(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.add_hook()
    victim = first_instance(sb)
    sb.emu.terminate(victim)
    sb.emu.detach(sb.guard)
    assert sb.instances()[victim] == "InService"  # moto's own view: it knows no Terminating:Wait


# --- packaging ----------------------------------------------------------------------------------
def test_nothing_outside_the_sandbox_imports_it_or_moto() -> None:
    """In a fresh interpreter, import every busy_guard module outside the sandbox: none may load
    ``busy_guard.sandbox`` (the CLI excepted, which runs the demo) and none may load ``moto``."""
    script = """
import importlib, pkgutil, sys

def walk(package, skip):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name.startswith(skip):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:
            continue  # a module under construction elsewhere is not this test's business
        if info.ispkg:
            walk(module, skip)

def loaded(*prefixes):
    return sorted(m for m in sys.modules if m.split(".")[0] in prefixes or m.startswith(prefixes))

import busy_guard
walk(busy_guard, ("busy_guard.sandbox", "busy_guard.cli"))
print("lambda:" + ",".join(loaded("moto", "busy_guard.sandbox")))
walk(busy_guard, ("busy_guard.sandbox",))
print("cli:" + ",".join(loaded("moto")))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == ["lambda:", "cli:"]
