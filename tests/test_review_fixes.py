"""The independent review's protocol fixes, each shown end to end on the sandbox (moto, the lifecycle
hook emulator behind the real boto3 client, and the real handler). Every test here fails on the guard
before the fix: the heartbeat on every tick, a release trusting a copy of the item, a deleted group
failing every tick, a lost warm-pool event never recovered, the configured hook taken for the real
one, an unbounded tick, nested retries, the event's time ignored, fractional TTLs.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from busy_guard import schema, settings
from busy_guard.guard import handler as guard_handler
from busy_guard.guard.deadline import Deadline
from busy_guard.guard.observability import logger
from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.world import HOOK, AwsCallCounter, Sandbox, SandboxSettings, scheduled_event

START = 1_800_000_000.0
GROUP = "graph-db"
TICK = 60.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def sandbox(clock: ManualClock) -> Iterator[Sandbox]:
    with Sandbox.start(clock=clock) as world:
        yield world


def completions(sb: Sandbox, instance_id: str) -> list[tuple[str, str]]:
    return [(c.result, c.by) for c in sb.emulator.completions(instance_id)]


def ticks(sb: Sandbox, clock: ManualClock, count: int, *, renew: Any = None) -> None:
    for _ in range(count):
        clock.advance(TICK)
        if renew is not None:
            assert Sandbox.renew(renew)
        sb.tick()


# --- 1. heartbeat only when due -------------------------------------------------------------------
def test_a_held_instance_is_heartbeaten_only_when_a_third_of_the_timeout_has_passed(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance, lease_ttl=7200)
    sandbox.terminate(instance)
    calls = AwsCallCounter.of_guard(sandbox)
    ticks(sandbox, clock, 60)  # an hour of one-minute ticks
    # 900 s hook: the first tick (the item can't say when the hook's timer started), then every
    # 300 s: 1 + 59 // 5 = 12, where a heartbeat on every tick made 60.
    assert calls.take()["RecordLifecycleActionHeartbeat"] == 12
    assert sandbox.emulator.completions(instance) == []  # never timed out
    assert sandbox.emulator.state(instance) == "Terminating:Wait"
    item = sandbox.item(instance)
    assert item.draining is not None and item.draining.heartbeat_at == clock() - 4 * TICK
    # Recording the heartbeat changes the item, but the stream filter still admits only "the last
    # lease ended": nothing of the hour's writes reaches the guard.
    assert sandbox.pump_stream() is None
    Sandbox.end(lease)
    assert sandbox.pump_stream() is not None
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]


# --- 2. never trust a trigger's copy of the item ----------------------------------------------------
def _stream_record(image: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    return {
        "eventID": "1",
        "eventName": "MODIFY",
        "eventSource": "aws:dynamodb",
        "dynamodb": {
            "Keys": {schema.INSTANCE_ID: image[schema.INSTANCE_ID]},
            "NewImage": image,
            "OldImage": old,
            "SequenceNumber": "4242",
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        },
    }


def test_a_forged_stream_image_cannot_release_an_instance_holding_a_live_lease(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance, lease_ttl=3600)
    sandbox.terminate(instance)
    clock.advance(5)
    real = sandbox.dynamodb.get_item(TableName=sandbox.table_name, Key=schema.key(instance))["Item"]
    # Whoever may invoke the function hands it an image that says the last lease ended, copying
    # everything the old claim checked (the draining mark, the writer's timestamp).
    forged = {k: v for k, v in real.items() if k != schema.LEASES}
    forged[schema.COUNTER] = {"N": "0"}
    result = guard_handler.route({"Records": [_stream_record(forged, real)]}, sandbox.guard)
    assert result["outcomes"][0]["step"] != "completed"
    assert completions(sandbox, instance) == []
    item = sandbox.item(instance)
    assert item.draining is not None and item.released is None and len(item.leases) == 1
    Sandbox.end(lease)


def test_a_tick_proves_a_recorded_release_before_completing_it_again(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    """A release mark beside a live lease (a forged or restored item): the tick's repeat of the
    recorded completion must not let the instance go; it holds it as a wait of its own."""
    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance, lease_ttl=3600)
    sandbox.terminate(instance)
    sandbox.dynamodb.update_item(
        TableName=sandbox.table_name,
        Key=schema.key(instance),
        UpdateExpression="SET #r = :r REMOVE #d",
        ExpressionAttributeNames={"#r": schema.RELEASED, "#d": schema.DRAINING},
        ExpressionAttributeValues={":r": schema.released_value(schema.Released(clock(), "idle", "someone"))},
    )
    ticks(sandbox, clock, 3, renew=lease)
    assert completions(sandbox, instance) == []
    item = sandbox.item(instance)
    assert item.draining is not None  # looked at again, and held
    assert sandbox.emulator.heartbeats(instance) >= 1
    Sandbox.end(lease)
    clock.advance(TICK)
    sandbox.tick()
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]


# --- 3. a deleted group or hook -----------------------------------------------------------------------
def test_a_deleted_group_is_recorded_gone_instead_of_failing_every_tick(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.begin(instance, lease_ttl=7200)
    sandbox.terminate(instance)
    ticks(sandbox, clock, 1)
    sandbox.autoscaling.delete_auto_scaling_group(AutoScalingGroupName=GROUP, ForceDelete=True)
    clock.advance(5 * TICK)
    sandbox.tick()  # no ReconcileError: the describe call proved the group gone
    item = sandbox.item(instance)
    assert item.draining is None and item.released is not None and item.released.reason == "gone"
    ticks(sandbox, clock, 2)  # and nothing is left to fail later ticks


def test_a_deleted_hook_is_recorded_gone(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.begin(instance, lease_ttl=7200)
    sandbox.terminate(instance)
    sandbox.autoscaling.delete_lifecycle_hook(AutoScalingGroupName=GROUP, LifecycleHookName=HOOK)
    clock.advance(5 * TICK)
    sandbox.tick()
    released = sandbox.item(instance).released
    assert released is not None and released.reason == "gone"


# --- 4. warm pools ------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_group", [True, False], ids=["listed-in-group", "warm-pool-only"])
def test_a_lost_warm_pool_event_is_recovered_by_the_tick(clock: ManualClock, in_group: bool) -> None:
    with Sandbox.start(SandboxSettings(warm_returns_in_group=in_group), clock=clock) as sb:
        sb.autoscaling.put_warm_pool(AutoScalingGroupName=GROUP, PoolState="Stopped")
        instance = sb.instances(GROUP)[0]
        lease = sb.begin(instance, lease_ttl=7200)
        sb.terminate(instance, destination="WarmPool", deliver=False)  # the event is lost
        ticks(sb, clock, 20, renew=lease)  # longer than the 900 s HeartbeatTimeout
        assert sb.emulator.completions(instance) == []  # held, never timed out
        assert sb.item(instance).draining is not None
        Sandbox.end(lease)
        ticks(sb, clock, 1)
        assert completions(sb, instance) == [("CONTINUE", "guard")]
        assert sb.emulator.state(instance) == "Warmed:Stopped"


# --- 5. the real hook ---------------------------------------------------------------------------------
def test_the_hooks_real_timeout_is_used_and_a_mismatch_is_logged_and_counted(
    sandbox: Sandbox, clock: ManualClock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Edited outside the stack: 300 s, where the guard is configured for 900 s.
    sandbox.autoscaling.put_lifecycle_hook(
        AutoScalingGroupName=GROUP,
        LifecycleHookName=HOOK,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=300,
        DefaultResult="ABANDON",
    )
    stream = io.StringIO()
    monkeypatch.setattr(logger.registered_handler, "stream", stream)
    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance, lease_ttl=7200)
    sandbox.terminate(instance)
    ticks(sandbox, clock, 30, renew=lease)
    assert sandbox.emulator.completions(instance) == []  # heartbeaten by the real 300 s timeout
    assert sandbox.emulator.state(instance) == "Terminating:Wait"
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert sum(1 for m in metrics if "HookConfigMismatch" in m) == 30
    warnings = [json.loads(line) for line in stream.getvalue().splitlines() if "differs" in line]
    assert warnings and "HeartbeatTimeout=300, DefaultResult=ABANDON" in warnings[0]["message"]
    Sandbox.end(lease)


# --- 6. a bounded tick ----------------------------------------------------------------------------------
def test_a_table_of_junk_and_forged_items_costs_a_bounded_tick(
    sandbox: Sandbox, clock: ManualClock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "MAX_TICK_WORK", 10)
    draining = schema.draining_value(schema.Draining(clock(), GROUP, HOOK))
    junk = {"S": "x" * 100_000}
    forged = [f"i-{n:017x}" for n in range(30)]
    invalid = ["../../etc", "i-NOTANID", "i-" + "f" * 40, "arn:aws:ec2:x", "i-12"]
    for instance_id in forged + invalid:
        sandbox.dynamodb.put_item(
            TableName=sandbox.table_name,
            Item={schema.INSTANCE_ID: {"S": instance_id}, schema.DRAINING: draining, "junk": junk},
        )
    sent: list[str] = []
    scanned: list[int] = []

    def record(params: Any, **_: Any) -> None:
        body = params.get("body")
        if isinstance(body, dict) and "InstanceId" in body:
            sent.append(body["InstanceId"])

    def size(http_response: Any, **_: Any) -> None:
        scanned.append(len(http_response.content))

    sandbox.guard.hooks.client.meta.events.register("before-call.auto-scaling.*", record)
    sandbox.guard.table.client.meta.events.register("after-call.dynamodb.Scan", size)
    calls = AwsCallCounter.of_guard(sandbox)
    clock.advance(TICK)
    sandbox.tick()
    taken = calls.take()
    # Each forged mark is idle: claimed, then completed ("no active action": someone else's). Ten,
    # the cap, where the whole table made 35.
    assert taken["CompleteLifecycleAction"] == 10 and taken["UpdateItem"] == 10, taken
    assert not set(sent) & set(invalid)  # a junk id never reaches Auto Scaling
    assert sum(scanned) < 50_000  # projected: the 3.5 MB of junk never read
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert any(m.get("TickWorkCapped") == [20.0] for m in metrics), metrics
    assert any(m.get("RejectedItems") == [5.0] for m in metrics), metrics
    ticks(sandbox, clock, 2)  # the rest, ten at a time
    assert all(sandbox.item(i).released is not None for i in forged)


# --- 7. one layer of retries, and a deadline ----------------------------------------------------------
def test_a_throttled_call_is_retried_by_one_layer_only(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.begin(instance, lease_ttl=7200)
    sandbox.terminate(instance)
    sandbox.emulator.fail_next("RecordLifecycleActionHeartbeat", "Throttling", count=100)
    before = sandbox.emulator.calls("RecordLifecycleActionHeartbeat").attempted
    clock.advance(TICK)
    with pytest.raises(guard_handler.ReconcileError, match="Throttling"):
        sandbox.tick()
    attempts = sandbox.emulator.calls("RecordLifecycleActionHeartbeat").attempted - before
    assert attempts == settings.AWS_MAX_ATTEMPTS  # botocore's standard mode only, never 4 x 3
    sandbox.emulator.clear_faults()


def test_unprocessed_keys_are_asked_for_again_with_exponential_backoff(sandbox: Sandbox) -> None:
    slept: list[float] = []
    table = sandbox.guard.table
    monkey_sleep = slept.append
    table._sleep = monkey_sleep  # the adapter's injectable sleep
    answers = iter([2, 2, 0])  # two answers leave keys unprocessed, the third has them all

    def unprocessed(parsed: dict[str, Any], **_: Any) -> None:
        left = next(answers)
        if left:
            keys = [schema.key(f"i-{n:017x}") for n in range(left)]
            parsed["UnprocessedKeys"] = {sandbox.table_name: {"Keys": keys}}

    table.client.meta.events.register("after-call.dynamodb.BatchGetItem", unprocessed)
    states = table.get_many([f"i-{n:017x}" for n in range(3)])
    assert len(states) == 3 and len(slept) == 2
    base, cap = settings.BATCH_GET_BACKOFF_SECONDS
    assert slept[0] <= base and slept[1] <= min(cap, 2 * base)


def test_no_call_starts_that_could_outlast_the_invocation(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance, lease_ttl=7200)
    [event] = sandbox.terminate(instance, deliver=False)
    calls = AwsCallCounter.of_guard(sandbox)
    now = [0.0]
    # Less time left than one call with all of its retries may take.
    deadline = Deadline.after(settings.aws_call_budget_seconds() - 1, clock=lambda: now[0])
    result = guard_handler.route(event, sandbox.guard, deadline=deadline)
    assert result["outcomes"][0]["step"] == "deferred"
    assert sum(calls.take().values()) == 0
    with pytest.raises(guard_handler.ReconcileError, match="left"):
        guard_handler.route(scheduled_event(clock()), sandbox.guard, deadline=deadline)
    assert calls.take()["DescribeAutoScalingGroups"] == 0
    Sandbox.end(lease)


# --- 8. the stream filter and TTLs ----------------------------------------------------------------------
def test_the_filter_has_only_the_dynamodb_key_and_ttls_are_whole_seconds(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    assert set(schema.stream_filter_pattern()) == {"dynamodb"}
    clock.advance(0.75)
    instance = sandbox.instances(GROUP)[0]
    sandbox.terminate(instance)
    raw = sandbox.dynamodb.get_item(TableName=sandbox.table_name, Key=schema.key(instance))["Item"]
    assert re.fullmatch(r"\d+", raw[schema.TTL]["N"]), raw[schema.TTL]


# --- the wait starts with the event ---------------------------------------------------------------------
def test_the_wait_is_measured_from_the_lifecycle_events_time(clock: ManualClock) -> None:
    """A late event (EventBridge retried it) starts max_wait at the event's time, so max_wait and
    its alarm always end the wait before AWS's own global timeout does."""
    with Sandbox.start(SandboxSettings(max_wait=3600, heartbeat_timeout=900), clock=clock) as sb:
        instance = sb.instances(GROUP)[0]
        lease = sb.begin(instance, lease_ttl=7200)
        [event] = sb.terminate(instance, deliver=False)
        started = clock()
        clock.advance(100)  # delivered late; no tick ran in between
        sb.invoke(event)
        item = sb.item(instance)
        assert item.draining is not None and item.draining.since == started
        ticks(sb, clock, 59, renew=lease)  # 100 s + 59 min: max_wait has passed since the event
        # (measured from the first look, it would still be 40 s away)
        assert completions(sb, instance) == [("CONTINUE", "guard")]
        released = sb.item(instance).released
        assert released is not None and released.reason == "max_wait_exceeded"


# --- 9. one settings module -----------------------------------------------------------------------------
def test_every_environment_name_is_spelled_only_in_the_settings_module() -> None:
    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("lambdas/busy_guard/**/*.py"), *root.glob("infra/**/*.py")]
    spelled = Counter()
    for path in sources:
        if path.name == "settings.py" or "cdk.out" in path.parts:
            continue
        for name in re.findall(r"""["'](BUSY_GUARD_[A-Z_]+)["']""", path.read_text()):
            spelled[f"{path.relative_to(root)}: {name}"] += 1
    assert not spelled, spelled
