"""The guard through its real handler entry, on moto plus the lifecycle-hook emulator, with the
table and its stream on each engine (moto, and Amazon DynamoDB Local: real stream records).

Every scenario drives the three triggers the way AWS would (the rule's event, the filtered table
stream, the schedule) and asserts what an on-call engineer would check: did the hook complete,
when, with which result, and what the item says.
"""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from busy_guard import schema
from busy_guard.guard.handler import ReconcileError
from busy_guard.guard.observability import logger
from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.dynamodb_local import DynamoDBLocal
from busy_guard.sandbox.world import AwsCallCounter, Sandbox, SandboxSettings
from busy_guard.settings import Env

START = 1_800_000_000.0
GROUP = "graph-db"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def sandbox(clock: ManualClock, sandbox_engine: DynamoDBLocal | None) -> Iterator[Sandbox]:
    with Sandbox.start(clock=clock, dynamodb_local=sandbox_engine) as world:
        yield world


def run_ticks(sb: Sandbox, clock: ManualClock, seconds: float, every: float = 300) -> None:
    """Schedule ticks over ``seconds``; every 5 minutes keeps a 15-minute hook alive."""
    elapsed = 0.0
    while elapsed < seconds:
        step = min(every, seconds - elapsed)
        clock.advance(step)
        elapsed += step
        sb.tick()


def completions(sb: Sandbox, instance_id: str) -> list[tuple[str, str]]:
    return [(c.result, c.by) for c in sb.emulator.completions(instance_id)]


# --- the decision table, end to end ------------------------------------------------------------------
def test_idle_instance_is_released_at_once(sandbox: Sandbox) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.terminate(instance)
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]
    assert sandbox.emulator.state(instance) == "Terminated"
    item = sandbox.item(instance)
    assert item.released is not None and item.released.reason == "idle"
    assert item.draining is None
    assert item.expires_at == START + sandbox.guard_config.released_ttl  # the item cleans itself up


def test_busy_instance_waits_then_is_released_by_the_stream(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance)
    sandbox.terminate(instance)
    assert sandbox.emulator.state(instance) == "Terminating:Wait"
    assert sandbox.item(instance).draining is not None

    for _ in range(6):  # the work goes on; the schedule keeps the hook alive
        clock.advance(60)
        assert sandbox.renew(lease)
        sandbox.tick()
    # Heartbeats when due: the first tick (the item can't say when the hook's timer started), then
    # once a third of the 15-minute HeartbeatTimeout has passed.
    assert sandbox.emulator.heartbeats(instance) == 2
    assert completions(sandbox, instance) == []

    Sandbox.end(lease)
    result = sandbox.pump_stream()  # the last lease just ended: the filtered stream wakes the guard
    assert result is not None and result["outcomes"][0]["step"] == "completed"
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]
    released = sandbox.item(instance).released
    assert released is not None and released.reason == "idle"


def test_busy_instance_is_released_by_the_next_tick_without_the_stream(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance)
    sandbox.terminate(instance)
    Sandbox.end(lease)  # stream record lost: never pumped
    assert completions(sandbox, instance) == []
    clock.advance(60)
    sandbox.tick()
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]


def test_crashed_writer_is_released_after_lease_expiry_as_stale(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.begin(instance, lease_ttl=180)  # the process dies: no heartbeat, no end
    sandbox.terminate(instance)
    clock.advance(180)  # expired, but inside the 30 s clock-skew allowance
    sandbox.tick()
    assert completions(sandbox, instance) == []
    clock.advance(31)
    sandbox.tick()
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]
    released = sandbox.item(instance).released
    assert released is not None and released.reason == "stale"


def test_legacy_counter_item_waits_until_the_stale_window(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.dynamodb.put_item(
        TableName=sandbox.table_name,
        Item={
            schema.INSTANCE_ID: {"S": instance},
            schema.COUNTER: {"N": "2"},
            schema.LAST_OP_AT: {"S": schema.iso(START - 3600)},
        },
    )
    sandbox.terminate(instance)
    run_ticks(sandbox, clock, 4 * 3600)
    assert completions(sandbox, instance) == []
    run_ticks(sandbox, clock, 3600 + 60)  # newest marker now older than 6 h
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]
    assert sandbox.item(instance).released.reason == "stale"  # type: ignore[union-attr]


def test_legacy_negative_counter_is_idle(sandbox: Sandbox) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.dynamodb.put_item(
        TableName=sandbox.table_name,
        Item={schema.INSTANCE_ID: {"S": instance}, schema.COUNTER: {"N": "-2"}},
    )
    sandbox.terminate(instance)
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]


def test_legacy_active_leases_item(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.dynamodb.put_item(
        TableName=sandbox.table_name,
        Item={
            schema.INSTANCE_ID: {"S": instance},
            schema.LEGACY_LEASES: {"SS": [f"{schema.iso(START - 60)}|sec_staging|abc"]},
        },
    )
    sandbox.terminate(instance)
    clock.advance(60)
    sandbox.tick()
    assert completions(sandbox, instance) == []
    assert sandbox.emulator.heartbeats(instance) == 1
    run_ticks(sandbox, clock, 6 * 3600)
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]


@pytest.mark.parametrize("result", ["CONTINUE", "ABANDON"])
def test_max_wait_releases_live_work(
    clock: ManualClock, result: str, sandbox_engine: DynamoDBLocal | None
) -> None:
    settings = SandboxSettings(max_wait=3600, heartbeat_timeout=900, max_wait_result=result)
    with Sandbox.start(settings, clock=clock, dynamodb_local=sandbox_engine) as sb:
        instance = sb.instances(GROUP)[0]
        lease = sb.begin(instance, lease_ttl=10 * 3600)
        sb.terminate(instance)
        run_ticks(sb, clock, 3600 - 60)
        assert completions(sb, instance) == []
        clock.advance(60)
        sb.tick()
        assert completions(sb, instance) == [(result, "guard")]
        assert sb.item(instance).released.reason == "max_wait_exceeded"  # type: ignore[union-attr]
        del lease


def test_dynamodb_errors_hold_the_instance_and_heal_on_the_next_tick(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    instance = sandbox.instances(GROUP)[0]
    failing = {"on": True}

    def deny(**_: Any) -> Any:
        if not failing["on"]:
            return None
        error = {"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}}
        return _http(400), error

    sandbox.guard.table.client.meta.events.register("before-call.dynamodb.*", deny)
    sandbox.terminate(instance)  # idle, but the guard can't prove it
    for _ in range(3):
        clock.advance(60)
        with pytest.raises(ReconcileError, match="Scan failed: AccessDeniedException"):
            sandbox.tick()  # the tick holds the instance, and fails loudly for the Errors alarm
    assert completions(sandbox, instance) == []  # never CONTINUE early
    assert sandbox.emulator.heartbeats(instance) >= 3
    failing["on"] = False
    clock.advance(60)
    sandbox.tick()
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]


def test_duplicate_and_late_events_make_no_second_completion(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    [event] = sandbox.terminate(instance)
    calls = AwsCallCounter.of_guard(sandbox)
    clock.advance(5)
    result = sandbox.invoke(event)  # EventBridge delivers at least once
    assert result["outcomes"][0]["step"] == "already_done"
    assert calls.take() == Counter({"UpdateItem": 1})  # no second CompleteLifecycleAction at all
    sandbox.invoke(json.loads(json.dumps(event)))
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]
    assert sandbox.emulator.calls("CompleteLifecycleAction").accepted == 1


def test_concurrent_triggers_complete_once(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance)
    [event] = sandbox.terminate(instance)
    Sandbox.end(lease)
    clock.advance(1)
    calls = AwsCallCounter.of_guard(sandbox)
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def trigger(action: Any) -> None:
        barrier.wait()
        try:
            action()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [
        threading.Thread(target=trigger, args=(lambda: sandbox.invoke(event),)),
        threading.Thread(target=trigger, args=(sandbox.pump_stream,)),
        threading.Thread(target=trigger, args=(sandbox.tick,)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]
    # The release is a claim: only its winner calls CompleteLifecycleAction.
    assert calls.take()["CompleteLifecycleAction"] == 1


# --- calls per decision ---------------------------------------------------------------------------
def test_calls_per_decision(sandbox: Sandbox, clock: ManualClock) -> None:
    idle, busy = sandbox.instances(GROUP)[:2]
    calls = AwsCallCounter.of_guard(sandbox)
    sandbox.terminate(idle)
    idle_calls = calls.take()
    assert sum(idle_calls.values()) <= 2, idle_calls
    assert idle_calls["CompleteLifecycleAction"] == 1

    lease = sandbox.begin(busy)
    sandbox.terminate(busy)
    first_look = calls.take()
    assert sum(first_look.values()) <= 2, first_look

    clock.advance(60)
    sandbox.tick()
    tick = calls.take()
    # Listing (1 describe page + 1 scan), our hook read once per container, then the first tick's
    # heartbeat (the item can't say when the hook's timer started) and its record on the item.
    listing = tick.pop("DescribeAutoScalingGroups") + tick.pop("Scan")
    assert listing == 2 and tick.pop("DescribeLifecycleHooks") == 1
    assert tick == Counter({"RecordLifecycleActionHeartbeat": 1, "UpdateItem": 1}), tick

    # Until a third of the 15-minute HeartbeatTimeout has passed, a tick only lists.
    for _ in range(4):
        clock.advance(60)
        assert sandbox.renew(lease)
        calls.take()
        sandbox.tick()
        assert calls.take() == Counter({"DescribeAutoScalingGroups": 1, "Scan": 1})
    clock.advance(60)
    sandbox.tick()
    assert calls.take()["RecordLifecycleActionHeartbeat"] == 1

    Sandbox.end(lease)
    sandbox.pump_stream()
    released = calls.take()
    assert released == Counter({"UpdateItem": 1, "CompleteLifecycleAction": 1})


# --- edge cases -------------------------------------------------------------------------------------
def test_lost_event_is_adopted_by_the_schedule(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.terminate(instance, deliver=False)
    clock.advance(60)
    sandbox.tick()
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]


def test_new_work_is_refused_while_draining(sandbox: Sandbox) -> None:
    from busy_guard.writer import InstanceDrainingError

    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance)
    sandbox.terminate(instance)
    with pytest.raises(InstanceDrainingError):
        sandbox.begin(instance)
    Sandbox.end(lease)


def test_another_hooks_wait_is_skipped_after_ours_completes(
    clock: ManualClock, sandbox_engine: DynamoDBLocal | None
) -> None:
    settings = SandboxSettings(extra_hooks=("someone-elses-hook",))
    with Sandbox.start(settings, clock=clock, dynamodb_local=sandbox_engine) as sb:
        instance = sb.instances(GROUP)[0]
        sb.terminate(instance)
        assert completions(sb, instance) == [("CONTINUE", "guard")]
        assert sb.emulator.state(instance) == "Terminating:Wait"  # the other hook still holds it
        calls = AwsCallCounter.of_guard(sb)
        for _ in range(5):
            clock.advance(60)
            sb.tick()
        taken = calls.take()
        # One retry (in case our completion was lost), answered "no active action": confirmed on
        # the item, and from then on the instance is left to the other hook.
        assert taken["CompleteLifecycleAction"] == 1
        released = sb.item(instance).released
        assert released is not None and released.confirmed_at is not None
        assert completions(sb, instance) == [("CONTINUE", "guard")]


@pytest.mark.parametrize("again", ["refresh", "warm-pool"])
def test_a_lost_event_behind_an_old_release_mark_is_still_guarded(
    sandbox: Sandbox, clock: ManualClock, again: str
) -> None:
    """A warm-pool instance released by an operator (its lease still on the item) comes back and
    terminates again before any tick saw it in service, and that event is lost. The old release
    mark once made every tick skip it as "another hook's wait": the hook timed out with the lease
    live (the model test found it). Now the tick probes our hook, adopts the wait and holds it."""
    from busy_guard.guard.autoscaling import LifecycleHooks
    from busy_guard.guard.table import BusyTable

    instance = sandbox.instances(GROUP)[0]
    sandbox.begin(instance, lease_ttl=10 * 3600)  # a long load: its process stops with the instance
    sandbox.terminate(instance, destination="WarmPool")
    LifecycleHooks(sandbox.autoscaling, "busy-guard").complete(GROUP, instance, "CONTINUE")
    now = clock()
    released = schema.Released(now, "operator: test", "operator")
    BusyTable(sandbox.dynamodb, sandbox.table_name).release(
        instance, released, ttl=now + 3600, draining_since=None
    )
    clock.advance(sandbox.guard_config.heartbeat_timeout + 60)  # past one HeartbeatTimeout, no tick
    sandbox.emulator.relaunch(instance)
    sandbox.emulator.terminate(
        instance, destination="WarmPool" if again == "warm-pool" else "EC2", should_decrement=False
    )  # its event is lost
    run_ticks(sandbox, clock, 3 * sandbox.guard_config.heartbeat_timeout, every=60)

    assert [c.by for c in sandbox.emulator.completions(instance)] == ["guard"]  # the operator's
    assert sandbox.emulator.state(instance) in ("Terminating:Wait", "Warmed:Pending:Wait")
    item = sandbox.item(instance)
    assert item.draining is not None and item.draining.heartbeat_at is not None


def test_instance_gone_from_the_group_is_marked_released(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    sandbox.begin(instance, lease_ttl=10 * 3600)
    sandbox.terminate(instance)
    # Someone completes our hook behind the guard's back (an operator with the CLI of another tool).
    sandbox.autoscaling.complete_lifecycle_action(
        AutoScalingGroupName=GROUP,
        LifecycleHookName="busy-guard",
        InstanceId=instance,
        LifecycleActionResult="CONTINUE",
    )
    clock.advance(3 * 60)
    sandbox.tick()
    item = sandbox.item(instance)
    assert item.draining is None
    assert item.released is not None and item.released.reason == "gone"
    assert item.expires_at is not None


def test_malformed_stream_record_never_loses_the_valid_one(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance)
    sandbox.terminate(instance)
    Sandbox.end(lease)
    clock.advance(1)
    good = sandbox._new_stream_records()[-1]
    result = sandbox.invoke({"Records": [{"dynamodb": "garbage"}, 42, good]}, "stream")
    assert result["batchItemFailures"] == []
    assert [o["step"] for o in result["outcomes"]] == ["completed"]


def test_every_log_line_names_the_instance_and_group(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(logger.registered_handler, "stream", stream)
    instance = sandbox.instances(GROUP)[0]
    sandbox.terminate(instance)
    logs = [json.loads(line) for line in stream.getvalue().splitlines()]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    decisions = [line for line in logs if line.get("step")]
    assert decisions, logs
    assert all(line["instance_id"] == instance and line["asg"] == GROUP for line in decisions)
    metrics = [line for line in lines if "_aws" in line]
    completed = [m for m in metrics if "LifecycleActionsCompleted" in m]
    assert completed and completed[0]["reason"] == "idle"
    assert any("HookWaitSeconds" in m for m in metrics)


def _http(status: int) -> Any:
    from botocore.awsrequest import AWSResponse

    return AWSResponse("https://dynamodb.us-east-1.amazonaws.com/", status, {}, None)


def test_warm_pool_return_is_guarded_and_the_instance_works_again(
    sandbox: Sandbox, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from busy_guard import identity

    instance = sandbox.instances(GROUP)[0]
    lease = sandbox.begin(instance, lease_ttl=3600)
    sandbox.terminate(instance, destination="WarmPool")
    assert sandbox.emulator.state(instance) == "Warmed:Pending:Wait"
    run_ticks(sandbox, clock, 600)
    assert completions(sandbox, instance) == []
    assert sandbox.emulator.heartbeats(instance) >= 2  # held, not mistaken for gone
    Sandbox.end(lease)
    sandbox.pump_stream()
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]

    clock.advance(3600)
    sandbox.emulator.relaunch(instance)  # same id, a new boot
    monkeypatch.setattr(identity, "boot_time", lambda: clock() - 5)
    second = sandbox.begin(instance)  # the old release mark does not refuse work after a reboot
    item = sandbox.item(instance)
    assert item.released is None and item.expires_at is None  # TTL can't delete a live instance
    sandbox.terminate(instance)
    item = sandbox.item(instance)
    assert item.draining is not None and item.draining.since == clock()  # a fresh wait
    assert len(completions(sandbox, instance)) == 1
    Sandbox.end(second)


def test_a_heartbeat_in_the_same_second_defeats_a_stale_claim(sandbox: Sandbox, clock: ManualClock) -> None:
    """The release is conditioned on the state it was decided on. The writer's timestamp has whole
    seconds; the lease's expiry does not, so a renewal right after the guard's read is still seen."""
    instance = sandbox.instances(GROUP)[0]
    quiet = sandbox.begin(instance, "sec_staging", lease_ttl=180)  # its process stops renewing
    other = sandbox.begin(instance, "bulk_table_insert", lease_ttl=3600)
    sandbox.terminate(instance)
    clock.advance(211.1)
    Sandbox.end(other)  # the writer's timestamp is now this second
    clock.advance(0.1)
    seen = sandbox.guard.table.get(instance)  # the guard's read: only an expired lease is left
    clock.advance(0.4)
    assert sandbox.renew(quiet)  # ...but its writer was alive after all, in the same second
    assert sandbox.item(instance).last_op_at_raw == seen.last_op_at_raw
    assert seen.draining is not None
    claimed, current = sandbox.guard.table.release(
        instance,
        schema.Released(at=clock(), reason="stale", by="test"),
        ttl=clock() + 60,
        draining_since=seen.draining.since,
        proof=schema.Proof(unchanged=seen),
    )
    assert not claimed
    assert current.draining is not None and current.leases[0].expires_at == clock() + 180
    sandbox.tick()  # the guard decides on the fresh state: busy again
    assert completions(sandbox, instance) == []
    Sandbox.end(quiet)


def test_a_guard_never_lets_go_of_another_guards_instance(
    clock: ManualClock, sandbox_engine: DynamoDBLocal | None
) -> None:
    """Two stacks may share one table: each guard's tick only ever acts on its own groups."""
    settings = SandboxSettings(groups={"team-a": 1, "team-b": 1}, env={"BUSY_GUARD_ASG_NAMES": "team-a"})
    with Sandbox.start(settings, clock=clock, dynamodb_local=sandbox_engine) as sb:
        [theirs] = sb.instances("team-b")
        lease = sb.begin(theirs, lease_ttl=3600)
        sb.terminate(theirs, deliver=False)  # guard B's event, not ours
        sb.guard.table.mark_draining(theirs, schema.Draining(since=clock(), asg="team-b", hook="busy-guard"))
        calls = AwsCallCounter.of_guard(sb)
        run_ticks(sb, clock, 5 * 60, every=60)
        item = sb.item(theirs)
        assert item.draining is not None and item.released is None  # still guard B's to release
        assert calls.take()["RecordLifecycleActionHeartbeat"] == 0
        Sandbox.end(lease)


def test_a_warm_instance_back_without_a_reboot_works_again_after_one_tick(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    """A Running (or Hibernated) warm pool returns the instance with the same boot time, so the
    writer's boot-time rule can't tell the old release mark apart: the tick clears it once the
    instance is InService again."""
    from busy_guard.writer import InstanceDrainingError

    instance = sandbox.instances(GROUP)[0]
    sandbox.terminate(instance, destination="WarmPool")
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]
    clock.advance(600)
    sandbox.emulator.relaunch(instance)
    with pytest.raises(InstanceDrainingError):
        sandbox.begin(instance)  # the mark of the finished termination still refuses work...
    clock.advance(60)
    sandbox.tick()
    item = sandbox.item(instance)
    assert item.released is None and item.expires_at is None  # ...until the next tick sees it InService
    Sandbox.end(sandbox.begin(instance))


def test_a_release_mark_is_kept_while_the_instance_still_terminates(
    clock: ManualClock, sandbox_engine: DynamoDBLocal | None
) -> None:
    settings = SandboxSettings(extra_hooks=("someone-elses-hook",))
    with Sandbox.start(settings, clock=clock, dynamodb_local=sandbox_engine) as sb:
        instance = sb.instances(GROUP)[0]
        sb.terminate(instance)
        run_ticks(sb, clock, 300, every=60)
        assert sb.emulator.state(instance) == "Terminating:Wait"
        assert sb.item(instance).released is not None  # not in service: the mark stays


def test_a_late_event_for_a_live_instance_blocks_its_work_for_one_tick_at_most(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    instance = sandbox.instances(GROUP)[0]
    [event] = sandbox.terminate(instance, destination="WarmPool", deliver=False)
    clock.advance(sandbox.guard_config.heartbeat_timeout + 1)
    sandbox.emulator.apply_timeouts()  # nobody answered: the hook's default result
    sandbox.emulator.relaunch(instance)
    clock.advance(60)
    result = sandbox.invoke(event)  # EventBridge delivers the old event now
    assert result["outcomes"][0]["step"] == "already_done"
    clock.advance(60)
    sandbox.tick()
    assert sandbox.item(instance).released is None
    Sandbox.end(sandbox.begin(instance))


def test_a_crashed_writers_lease_is_pruned_so_the_stream_still_wakes_the_guard(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    instance = sandbox.instances(GROUP)[0]
    orphan = sandbox.begin(instance, "sec_staging", lease_ttl=180)  # its process dies
    clock.advance(600)
    live = sandbox.begin(instance, "bulk_table_insert")  # a new process on the same instance
    item = sandbox.item(instance)
    assert [lease.lease_id for lease in item.leases] == [live.lease_id] and item.counter == 1
    sandbox.terminate(instance)
    Sandbox.end(live)
    result = sandbox.pump_stream()  # the counter went 1 -> 0: the fast path fires
    assert result is not None and result["outcomes"][0]["step"] == "completed"
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]
    del orphan


def test_a_lease_renewed_at_the_last_moment_is_not_pruned(sandbox: Sandbox, clock: ManualClock) -> None:
    instance = sandbox.instances(GROUP)[0]
    slow = sandbox.begin(instance, "sec_staging", lease_ttl=180)
    clock.advance(600)
    assert sandbox.renew(slow)  # late, but alive
    other = sandbox.begin(instance, "bulk_table_insert")
    assert {lease.lease_id for lease in sandbox.item(instance).leases} == {slow.lease_id, other.lease_id}
    Sandbox.end(slow)
    Sandbox.end(other)


# --- defects DynamoDB Local found ------------------------------------------------------------------------
def test_a_string_counter_never_makes_the_guard_raise(
    clock: ManualClock, sandbox_engine: DynamoDBLocal | None
) -> None:
    """A counter stored as a string is work of unknown age (the legacy rule). DynamoDB evaluates
    ``#count <= :zero`` on it as false; moto raised TypeError from its evaluator, and the guard with
    it. The idle condition checks the type first: the guard holds the instance, judges it by the
    stale window, and releases it as stale, on both engines.

    Which engine is right: DynamoDB Local. "If an item contains an AttributeValue element of a
    different type than the one provided in the request, the value does not match"
    (https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_ExpectedAttributeValue.html):
    a string never compares with a number, it makes the condition false, never an error."""
    settings = SandboxSettings(env={Env.LEGACY_STALE: "600"})
    with Sandbox.start(settings, clock=clock, dynamodb_local=sandbox_engine) as sb:
        instance = sb.instances(GROUP)[0]
        sb.dynamodb.put_item(
            TableName=sb.table_name,
            Item={
                "instance_id": {"S": instance},
                "active_destructive_ops": {"S": "1"},
                "last_destructive_op_at": {"S": schema.iso(clock())},
            },
        )
        sb.terminate(instance)
        assert completions(sb, instance) == []
        assert sb.item(instance).draining is not None
        run_ticks(sb, clock, 540, every=60)
        assert completions(sb, instance) == []
        run_ticks(sb, clock, 120, every=60)
        assert completions(sb, instance) == [("CONTINUE", "guard")]
        assert sb.item(instance).released.reason == "stale"  # type: ignore[union-attr]


def test_a_writer_repairs_a_string_counter_and_its_lease_holds_the_instance(sandbox: Sandbox) -> None:
    """End to end: the repaired item carries a real lease, so the guard waits for the work and the
    stream releases the instance when it ends."""
    instance = sandbox.instances(GROUP)[0]
    sandbox.dynamodb.put_item(
        TableName=sandbox.table_name,
        Item={"instance_id": {"S": instance}, "active_destructive_ops": {"S": "0"}},
    )
    lease = sandbox.begin(instance)
    sandbox.terminate(instance)
    assert completions(sandbox, instance) == []
    Sandbox.end(lease)
    result = sandbox.pump_stream()
    assert result is not None and result["outcomes"][0]["step"] == "completed"
    assert completions(sandbox, instance) == [("CONTINUE", "guard")]
