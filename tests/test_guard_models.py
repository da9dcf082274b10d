"""classify(): every documented AWS sample parses and routes; anything else is named, never raised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from busy_guard.guard.models import Ignored, Malformed, StreamBatch, Termination, Tick, classify

FIXTURES = Path(__file__).parent / "fixtures" / "events"


def sample(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())  # type: ignore[no-any-return]


def test_documented_terminate_event_parses_every_field() -> None:
    invocation = classify(sample("terminate-lifecycle-action.json"))
    assert isinstance(invocation, Termination)
    detail = invocation.detail
    assert detail.EC2InstanceId == "i-1234567890abcdef0"
    assert detail.AutoScalingGroupName == "my-asg"
    assert detail.LifecycleHookName == "my-lifecycle-hook"
    assert detail.LifecycleActionToken == "87654321-4321-4321-4321-210987654321"
    assert (detail.NotificationMetadata, detail.Origin, detail.Destination) == (
        "additional-info",
        "AutoScalingGroup",
        "EC2",
    )
    assert invocation.event.time.year == 2021


def test_warm_pool_termination_is_a_termination() -> None:
    invocation = classify(sample("terminate-to-warm-pool.json"))
    assert isinstance(invocation, Termination)
    assert invocation.detail.Destination == "WarmPool"


def test_schedule_and_stream_samples_route() -> None:
    assert isinstance(classify(sample("scheduled-event.json")), Tick)
    batch = classify(sample("dynamodb-stream-last-lease-ended.json"))
    assert isinstance(batch, StreamBatch)
    assert len(batch.records) == 1


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("launch-lifecycle-action.json", "launching"),
        ("test-notification.json", "TEST_NOTIFICATION"),
    ],
)
def test_recognised_but_not_ours_is_ignored(name: str, reason: str) -> None:
    invocation = classify(sample(name))
    assert isinstance(invocation, Ignored)
    assert reason in invocation.reason


def test_a_terminate_event_with_a_launch_transition_is_ignored() -> None:
    event = sample("terminate-lifecycle-action.json")
    event["detail"]["LifecycleTransition"] = "autoscaling:EC2_INSTANCE_LAUNCHING"
    assert isinstance(classify(event), Ignored)


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (lambda e: e["detail"].pop("EC2InstanceId"), "detail.EC2InstanceId"),
        (lambda e: e["detail"].update(EC2InstanceId="i-../../etc/passwd"), "detail.EC2InstanceId"),
        (lambda e: e["detail"].update(AutoScalingGroupName=42), "detail.AutoScalingGroupName"),
        (lambda e: e["detail"].update(LifecycleHookName="bad\nname"), "detail.LifecycleHookName"),
        (lambda e: e.update(time="yesterday"), "time"),
        (lambda e: e.update(detail="not a map"), "detail"),
    ],
)
def test_malformed_lifecycle_events_name_the_bad_field(mutate: Any, named: str) -> None:
    event = sample("terminate-lifecycle-action.json")
    mutate(event)
    invocation = classify(event)
    assert isinstance(invocation, Malformed)
    assert named in invocation.reason


@pytest.mark.parametrize("event", [None, [], "text", 42, {"source": "aws.s3"}, {"Records": "nope"}])
def test_anything_else_is_malformed_with_a_reason(event: Any) -> None:
    invocation = classify(event)
    assert isinstance(invocation, Malformed)
    assert invocation.reason
