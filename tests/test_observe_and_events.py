"""Observe-only mode and the events for people, with the real guard on a real ``moto_server`` (the
lifecycle-hook emulator behind its autoscaling client) and EventBridge delivering to SQS there."""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import pytest
from botocore.config import Config
from test_cli import GROUP, REGION, EmulatedSession, World, moto_server
from test_drain import busy_lease, end_lease, guard_on

from busy_guard.cli import main
from busy_guard.guard import handler
from busy_guard.guard.notify import GuardEvents
from busy_guard.sandbox.world import matches, scheduled_event

__all__ = ["moto_server"]


@pytest.fixture(scope="module")
def world(moto_server: str) -> World:
    return World(moto_server, instances=5)


# What the README's rule matches (it routes them to an SNS topic).
PEOPLE_RULE = {"source": ["busy-guard"], "detail-type": ["Instance held", "Instance released"]}


class Inbox:
    """The events PutEvents delivered to moto_server's default bus and it accepted, as EventBridge
    hands them to a rule's target. (moto delivers to targets only with jsonpath-ng installed, which
    this project does not need, so the test reads the accepted entries off the real client and
    matches them with the sandbox's EventBridge pattern matcher.)"""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._sent: list[list[dict[str, Any]]] = []
        self.accepted: list[dict[str, Any]] = []
        client.meta.events.register("before-parameter-build.eventbridge.PutEvents", self._before)
        client.meta.events.register("after-call.eventbridge.PutEvents", self._after)

    def _before(self, params: dict[str, Any], **_: Any) -> None:
        self._sent.append(params["Entries"])

    def _after(self, parsed: dict[str, Any], **_: Any) -> None:
        entries = self._sent.pop()
        for entry, result in zip(entries, parsed.get("Entries", []), strict=True):
            if "EventId" in result:
                self.accepted.append(
                    {
                        "source": entry["Source"],
                        "detail-type": entry["DetailType"],
                        "bus": entry["EventBusName"],
                        "detail": json.loads(entry["Detail"]),
                    }
                )

    def take(self) -> list[dict[str, Any]]:
        taken, self.accepted = self.accepted, []
        for event in taken:
            assert matches(PEOPLE_RULE, event), event
        return taken


def test_observe_only_never_holds_an_instance(
    world: World, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    guard, emulator = guard_on(world, BUSY_GUARD_OBSERVE_ONLY="true")
    busy, left_waiting = world.instances()[:2]
    lease = busy_lease(world, busy)
    before = world.item(busy)

    (event,) = emulator.terminate(busy)
    result = handler.route(event, guard)
    assert result == {
        "observe_only": True,
        "outcomes": [{"instance_id": busy, "step": "observed", "reason": "busy", "would": "WAIT"}],
    }
    assert [(c.result, c.by) for c in emulator.completions(busy)] == [("CONTINUE", "guard")]
    assert busy not in world.instances()
    assert world.item(busy) == before  # nothing written: the trial leaves the items as they were
    assert f"{busy}: observe-only: would WAIT (busy); completed with CONTINUE" in caplog.messages
    metric = capsys.readouterr().out  # the EMF line: counted by what it would have done
    assert '"would":"WAIT_busy","ObserveOnlyDecisions":[1.0]' in metric

    # A wait of ours still pending (a lost event, or one an enforcing guard left) is completed too.
    emulator.terminate(left_waiting)
    outcomes = handler.route(scheduled_event(time.time()), guard)["outcomes"]
    assert outcomes == [
        {"instance_id": left_waiting, "step": "observed", "reason": "idle", "would": "CONTINUE"}
    ]
    assert emulator.completions(left_waiting)[0].result == "CONTINUE"
    assert emulator.heartbeats(busy) == emulator.heartbeats(left_waiting) == 0
    end_lease(world, busy, lease)


def test_held_and_released_events_are_put_on_the_default_bus(world: World) -> None:
    guard, emulator = guard_on(world)
    inbox = Inbox(boto3.client("events", region_name=REGION, endpoint_url=world.endpoint))
    events = GuardEvents(inbox.client)
    instance = world.instances()[0]
    lease = busy_lease(world, instance)
    (event,) = emulator.terminate(instance)
    handler.route(event, guard, events=events)
    (held,) = inbox.take()
    assert held["source"] == "busy-guard" and held["detail-type"] == "Instance held"
    assert held["bus"] == "default"
    detail = dict(held["detail"])
    # Measured from the lifecycle event's time (whole seconds), when Terminating:Wait started.
    waited = detail.pop("waited_seconds")
    assert isinstance(waited, int) and waited >= 0
    assert detail == {
        "instance_id": instance,
        "group": GROUP,
        "reason": "busy",
        "action": "WAIT",
        "lease_kinds": ["bulk_table_insert"],
        "trigger": "event",
    }
    handler.route(scheduled_event(time.time()), guard, events=events)  # a heartbeat: no new event
    assert inbox.take() == []

    end_lease(world, instance, lease)
    handler.route(scheduled_event(time.time()), guard, events=events)
    (released,) = inbox.take()
    assert released["detail-type"] == "Instance released"
    detail = released["detail"]
    assert (detail["instance_id"], detail["reason"], detail["action"]) == (instance, "idle", "CONTINUE")
    assert detail["lease_kinds"] == [] and detail["waited_seconds"] >= 0 and detail["trigger"] == "schedule"


def test_a_failing_put_events_never_blocks_a_decision(world: World, caplog: pytest.LogCaptureFixture) -> None:
    guard, emulator = guard_on(world)
    dead = boto3.client(
        "events",
        region_name=REGION,
        endpoint_url="http://127.0.0.1:9",  # discard port: nothing listens
        config=Config(connect_timeout=0.5, retries={"total_max_attempts": 1}),
    )
    instance = world.instances()[0]
    (event,) = emulator.terminate(instance)
    (outcome,) = handler.route(event, guard, events=GuardEvents(dead))["outcomes"]
    assert (outcome["step"], outcome["reason"]) == ("completed", "idle")
    assert emulator.completions(instance)[0].result == "CONTINUE"
    assert any(message.startswith("PutEvents failed for 1 event(s)") for message in caplog.messages)


def test_status_shows_the_refresh_and_what_holds_it(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    guard, emulator = guard_on(world)
    instance = world.instances()[0]
    lease = busy_lease(world, instance)
    emulator.instance_refresh(GROUP, status="Successful", percent_complete=100)  # an older one
    refresh_id = emulator.instance_refresh(GROUP, percent_complete=40, instances_to_update=3)
    (event,) = emulator.terminate(instance)
    handler.route(event, guard)
    status = ["status", "--asg", GROUP, "--endpoint-url", world.endpoint]

    assert main([*status, "--json"], session=EmulatedSession(emulator)) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["version"] == 2 and document["observe_only"] is False
    (refresh,) = document["refreshes"]
    (held,) = refresh.pop("held_by")
    assert refresh == {
        "group": GROUP,
        "id": refresh_id,
        "status": "InProgress",
        "status_reason": None,
        "percent_complete": 40,
        "instances_to_update": 3,
        "started_at": refresh["started_at"],
    }
    assert held["instance_id"] == instance and 0 <= held["waiting_seconds"] <= 30
    (shown,) = held["leases"]
    assert shown["kind"] == "bulk_table_insert" and shown["holder"] == "worker-1:4242"
    assert 295 <= shown["age_seconds"] <= 340

    assert main(status, session=EmulatedSession(emulator)) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("instance refresh"))
    assert line.startswith(
        f"instance refresh of {GROUP}: InProgress 40%, 3 to update; held by {instance}: "
        "bulk_table_insert (worker-1:4242, 5m"
    )
    end_lease(world, instance, lease)


def test_status_says_observe_only(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _guard, emulator = guard_on(world)
    monkeypatch.setenv("BUSY_GUARD_OBSERVE_ONLY", "true")
    status = ["status", "--asg", GROUP, "--endpoint-url", world.endpoint]
    assert main([*status, "--json"], session=EmulatedSession(emulator)) == 0
    assert json.loads(capsys.readouterr().out)["observe_only"] is True
    assert main(status, session=EmulatedSession(emulator)) == 0
    assert "observe-only: the guard completes every termination at once" in capsys.readouterr().out
