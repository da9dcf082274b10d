"""One instance can't touch another's work: items keyed by the instance ARN (the isolated scheme).

IAM enforces the isolation (the writers' policy lets a caller update only the item keyed
``${ec2:SourceInstanceARN}``: tests/test_infra.py reads it in the template); what runs here is
everything the key scheme changes, end to end on the sandbox and on both engines: the writer leases
on its ARN item, the guard marks and releases that item, and a bare-id item (the replaced system's, or
a legacy writer's) still holds the instance while it has live work, proven in the release's own
transaction, never by a copy of it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from hypothesis import given
from hypothesis import strategies as st
from test_cli import EmulatedSession, put_lease

from busy_guard import schema, writer
from busy_guard.decision import Action, DecisionConfig, Reason, decide
from busy_guard.keys import LEGACY, InstanceKeys, instance_arn, instance_id_of
from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.dynamodb_local import DynamoDBLocal
from busy_guard.sandbox.environment import REGION
from busy_guard.sandbox.world import ACCOUNT, AwsCallCounter, Sandbox, SandboxSettings
from busy_guard.schema import BusyState, Draining, Lease
from busy_guard.settings import Env
from busy_guard.writer import InstanceDrainingError, begin_destructive_op_sync, end_destructive_op_sync

START = 1_800_000_000.0
GROUP = "graph-db"
KEYS = InstanceKeys.isolated_keys(account=ACCOUNT, region=REGION)


def arn(instance_id: str) -> str:
    return f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{instance_id}"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def start(clock: ManualClock, engine: DynamoDBLocal | None, settings: SandboxSettings | None = None) -> Any:
    return Sandbox.start(settings, clock=clock, dynamodb_local=engine)


@pytest.fixture
def sb(clock: ManualClock, sandbox_engine: DynamoDBLocal | None, isolated_keys: None) -> Iterator[Sandbox]:
    with start(clock, sandbox_engine) as world:
        yield world


def completions(sb: Sandbox, instance_id: str) -> list[tuple[str, str]]:
    return [(c.result, c.by) for c in sb.emulator.completions(instance_id)]


def legacy_begin(sb: Sandbox, instance_id: str, *, lease_ttl: float = 600) -> writer.LeaseHandle:
    """A writer of the replaced system's scheme: its lease lands on the bare-id item."""
    lease = begin_destructive_op_sync(
        instance_id, "bulk_table_insert", key_scheme="legacy", **sb.writer_options(lease_ttl)
    )
    assert lease is not None and lease.key == instance_id
    return lease


# --- the keys: pure -------------------------------------------------------------------------------
instance_ids = st.from_regex(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})", fullmatch=True)


@given(instance_ids)
def test_a_key_names_its_instance_and_only_its_scheme_owns_it(instance_id: str) -> None:
    key = KEYS.key(instance_id)
    assert key == arn(instance_id)
    assert KEYS.owner(key) == instance_id and instance_id_of(key) == instance_id
    assert KEYS.owner(instance_id) is None  # a bare id is a companion, never the instance's item
    assert KEYS.legacy_key(instance_id) == instance_id
    assert LEGACY.owner(instance_id) == instance_id and LEGACY.owner(key) is None
    other_account = KEYS.key(instance_id).replace(ACCOUNT, "999999999999")
    other_region = KEYS.key(instance_id).replace(REGION, "eu-west-1")
    assert KEYS.owner(other_account) is None and KEYS.owner(other_region) is None


@pytest.mark.parametrize(
    ("part", "kwargs"),
    [
        ("partition", {"partition": "gcp"}),
        ("region", {"region": "us_east_1"}),
        ("account", {"account": "12345"}),
        ("instance id", {"instance_id": "i-XYZ"}),
    ],
)
def test_a_malformed_arn_part_is_named(part: str, kwargs: dict[str, str]) -> None:
    parts = {"partition": "aws", "region": REGION, "account": ACCOUNT, "instance_id": "i-0123456789abcdef0"}
    with pytest.raises(ValueError, match=part):
        instance_arn(**{**parts, **kwargs})


def test_an_arn_keyed_item_parses_to_its_bare_instance_id() -> None:
    state = schema.parse_item(
        {schema.INSTANCE_ID: {"S": arn("i-0123456789abcdef0")}, schema.COUNTER: {"N": "0"}}
    )
    assert (state.instance_id, state.key) == ("i-0123456789abcdef0", arn("i-0123456789abcdef0"))


def test_every_partition_makes_its_own_arns() -> None:
    keys = InstanceKeys.isolated_keys(account=ACCOUNT, region="cn-north-1", partition="aws-cn")
    assert (
        keys.key("i-0123456789abcdef0") == f"arn:aws-cn:ec2:cn-north-1:{ACCOUNT}:instance/i-0123456789abcdef0"
    )


# --- one decision over two items: pure ------------------------------------------------------------
CONFIG = DecisionConfig(legacy_stale_after=6 * 3600)


def lease(expires_at: float, kind: str = "bulk_table_insert") -> Lease:
    return Lease("l1", kind, "host:1", expires_at - 600, expires_at - 60, expires_at)


def with_companion(companion: BusyState, *, own_leases: tuple[Lease, ...] = ()) -> BusyState:
    own = BusyState(
        "i-0123456789abcdef0", exists=True, leases=own_leases, draining=Draining(START, GROUP, "busy-guard")
    )
    return BusyState(**{**own.__dict__, "legacy": companion})


def test_live_work_on_the_bare_id_item_holds_an_idle_instance() -> None:
    state = with_companion(BusyState("i-0123456789abcdef0", exists=True, leases=(lease(START + 300),)))
    decision = decide(state, CONFIG, START)
    assert (decision.action, decision.reason) == (Action.WAIT, Reason.BUSY)
    assert "legacy (bare-id) item" in decision.detail and decision.live_leases == 1


def test_stale_work_on_either_item_is_stale_and_counted() -> None:
    old_counter = BusyState("i-0123456789abcdef0", exists=True, counter=1, last_op_at=START - 7 * 3600)
    decision = decide(with_companion(old_counter, own_leases=(lease(START - 120),)), CONFIG, START)
    assert (decision.reason, decision.stale_markers) == (Reason.STALE, 2)


def test_the_companions_own_marks_start_and_end_nothing() -> None:
    """A legacy-scheme guard's old marks on the bare-id item: not this wait's start, nor a release."""
    marked = BusyState(
        "i-0123456789abcdef0",
        exists=True,
        draining=Draining(START - 30 * 86400, GROUP, "busy-guard"),
        released=schema.Released(START - 86400, "idle", "guard"),
    )
    assert decide(with_companion(marked), CONFIG, START).reason is Reason.IDLE  # no max_wait from 30 days ago


# --- the writer ---------------------------------------------------------------------------------
def test_the_writer_leases_on_its_arn_item_only(sb: Sandbox) -> None:
    instance = sb.instances(GROUP)[0]
    lease = sb.begin(instance)
    assert (lease.instance_id, lease.key) == (instance, arn(instance))
    assert [x.lease_id for x in sb.item_at(arn(instance)).leases] == [lease.lease_id]
    assert not sb.item_at(instance).exists
    Sandbox.end(lease)
    assert sb.item_at(arn(instance)).leases == ()


def test_a_bare_id_without_an_arn_takes_no_lease_and_says_how_to_fix_it(
    sb: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    instance = sb.instances(GROUP)[0]
    writer.reset_caches()  # the warning is said once per process
    with caplog.at_level(logging.WARNING, "busy_guard"):
        assert begin_destructive_op_sync(instance, "backfill", **sb.writer_options()) is None
    assert "keys leases by the instance ARN, and none was found" in caplog.text
    assert "BUSY_GUARD_INSTANCE_ARN" in caplog.text and "BUSY_GUARD_KEY_SCHEME=legacy" in caplog.text
    assert not sb.item_at(instance).exists and not sb.item(instance).exists


def test_the_arn_comes_from_the_environment_and_must_name_the_same_instance(
    sb: Sandbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = sb.instances(GROUP)[:2]
    monkeypatch.setenv(Env.INSTANCE_ARN, arn(first))
    lease = begin_destructive_op_sync(None, "backfill", **sb.writer_options())
    assert lease is not None and lease.key == arn(first)
    end_destructive_op_sync(None, lease)
    with caplog.at_level(logging.ERROR, "busy_guard"):
        assert begin_destructive_op_sync(second, "backfill", **sb.writer_options()) is None
    assert f"names {first}, not {second}" in caplog.text
    assert not sb.item(second).exists


def test_an_arn_argument_that_is_no_instance_arn_is_a_caller_bug(sb: Sandbox) -> None:
    with pytest.raises(ValueError, match="not an EC2 instance ARN"):
        begin_destructive_op_sync(
            "arn:aws:ec2:us-east-1:123456789012:volume/vol-1", "x", **sb.writer_options()
        )


def test_an_unknown_key_scheme_is_a_caller_bug(sb: Sandbox) -> None:
    with pytest.raises(ValueError, match="key_scheme"):
        begin_destructive_op_sync(
            arn("i-0123456789abcdef0"), "x", key_scheme="per-host", **sb.writer_options()
        )


# --- the guard, end to end --------------------------------------------------------------------------
def test_a_busy_instance_is_held_on_its_arn_item_and_released_when_the_work_ends(sb: Sandbox) -> None:
    instance = sb.instances(GROUP)[0]
    lease = sb.begin(instance)
    sb.terminate(instance)
    assert sb.emulator.state(instance) == "Terminating:Wait"
    assert sb.item(instance).draining is not None and not sb.item_at(instance).exists
    with pytest.raises(InstanceDrainingError):
        sb.begin(instance, "second_job")  # the draining mark is on the very item the writer leases on
    Sandbox.end(lease)
    result = sb.pump_stream()
    assert result is not None and [o["step"] for o in result["outcomes"]] == ["completed"]
    assert completions(sb, instance) == [("CONTINUE", "guard")]
    released = sb.item(instance).released
    assert released is not None and released.reason == "idle"


def test_an_idle_instance_is_released_at_once(sb: Sandbox) -> None:
    instance = sb.instances(GROUP)[0]
    sb.terminate(instance)
    assert completions(sb, instance) == [("CONTINUE", "guard")]
    assert sb.item(instance).released is not None and not sb.item_at(instance).exists


def test_a_legacy_writers_live_lease_holds_the_instance_until_it_ends(
    sb: Sandbox, clock: ManualClock
) -> None:
    instance = sb.instances(GROUP)[0]
    legacy = legacy_begin(sb, instance)
    sb.terminate(instance)
    assert completions(sb, instance) == []
    assert sb.item(instance).draining is not None  # the guard marks the ARN item...
    assert sb.item_at(instance).draining is None  # ...and never writes the companion
    for _ in range(3):
        clock.advance(60)
        sb.tick()
    assert completions(sb, instance) == []
    end_destructive_op_sync(instance, legacy)
    clock.advance(60)
    sb.tick()
    assert completions(sb, instance) == [("CONTINUE", "guard")]


def test_a_forged_idle_image_does_not_release_an_instance_with_a_legacy_lease(sb: Sandbox) -> None:
    """The stream's copy of the ARN item is idle and draining; the bare-id item has live work. The
    release's transaction proves the companion too, so the copy releases nothing."""
    instance = sb.instances(GROUP)[0]
    legacy_begin(sb, instance)
    sb.terminate(instance)
    draining = sb.item(instance).draining
    assert draining is not None
    image = {
        schema.INSTANCE_ID: {"S": arn(instance)},
        schema.COUNTER: {"N": "0"},
        schema.DRAINING: schema.draining_value(draining),
    }
    record = {
        "eventID": "forged",
        "eventName": "MODIFY",
        "eventSource": "aws:dynamodb",
        "dynamodb": {
            "Keys": {schema.INSTANCE_ID: {"S": arn(instance)}},
            "OldImage": {**image, schema.COUNTER: {"N": "1"}},
            "NewImage": image,
            "SequenceNumber": "1",
        },
    }
    result = sb.invoke({"Records": [record]}, "stream")
    assert result["batchItemFailures"] == []
    assert completions(sb, instance) == []
    assert sb.emulator.state(instance) == "Terminating:Wait"
    assert sb.item(instance).released is None


def test_a_stale_legacy_counter_is_released_as_stale_once_its_window_passes(
    sb: Sandbox, clock: ManualClock
) -> None:
    instance = sb.instances(GROUP)[0]
    sb.dynamodb.put_item(
        TableName=sb.table_name,
        Item={
            schema.INSTANCE_ID: {"S": instance},
            schema.COUNTER: {"N": "1"},
            schema.LAST_OP_AT: {"S": schema.iso(clock() - 5 * 3600)},
        },
    )
    sb.terminate(instance)
    assert completions(sb, instance) == []  # 5 h old: still inside the 6 h stale window
    for _ in range(12):  # ticks every 5 minutes keep the hook alive for the hour
        clock.advance(300)
        sb.tick()
    assert completions(sb, instance) == [("CONTINUE", "guard")]
    released = sb.item(instance).released
    assert released is not None and released.reason == "stale"


def test_with_legacy_reads_off_a_bare_id_item_no_longer_holds(
    clock: ManualClock, sandbox_engine: DynamoDBLocal | None, isolated_keys: None
) -> None:
    """``readLegacyKeys=false``: the last step of a migration, once no bare-id item has live work."""
    settings = SandboxSettings(env={Env.READ_LEGACY_KEYS: "false"})
    with start(clock, sandbox_engine, settings) as sb:
        instance = sb.instances(GROUP)[0]
        legacy_begin(sb, instance)
        sb.terminate(instance)
        assert completions(sb, instance) == [("CONTINUE", "guard")]


def test_the_tick_acts_on_no_item_of_another_scheme_account_or_region(
    sb: Sandbox, clock: ManualClock
) -> None:
    instance = sb.instances(GROUP)[0]
    marked = {schema.DRAINING: schema.draining_value(Draining(clock() - 60, GROUP, "busy-guard"))}
    foreign = arn(instance).replace(ACCOUNT, "999999999999")
    for key in (foreign, instance):
        sb.dynamodb.put_item(TableName=sb.table_name, Item={schema.INSTANCE_ID: {"S": key}, **marked})
    report = sb.guard.tick()
    assert report.rejected == 1  # the other account's ARN: junk, counted
    assert [o.request.instance_id for o in report.outcomes] == []  # the bare-id mark: a companion only
    assert sb.item_at(foreign).draining is not None and sb.item_at(instance).released is None


def test_a_legacy_table_keys_by_bare_ids_end_to_end(
    clock: ManualClock, sandbox_engine: DynamoDBLocal | None
) -> None:
    """The legacy scheme (an imported table until it is migrated): the writer and the guard agree on
    bare ids, and no ARN item is ever written."""
    with start(clock, sandbox_engine, SandboxSettings(env={Env.KEY_SCHEME: "legacy"})) as sb:
        instance = sb.instances(GROUP)[0]
        lease = begin_destructive_op_sync(instance, "backfill", key_scheme="legacy", **sb.writer_options())
        assert lease is not None and lease.key == instance
        sb.terminate(instance)
        assert sb.item_at(instance).draining is not None and not sb.item_at(arn(instance)).exists
        end_destructive_op_sync(instance, lease)
        sb.pump_stream()
        assert completions(sb, instance) == [("CONTINUE", "guard")]


# --- the CLI ------------------------------------------------------------------------------------
def test_status_release_and_drain_work_on_arn_items_and_see_legacy_ones(
    clock: ManualClock, capsys: pytest.CaptureFixture[str], isolated_keys: None
) -> None:
    """On moto, like the CLI's other in-process tests (the emulator sits behind the CLI's session)."""
    with start(clock, None) as sb:
        _status_release_and_drain(sb, clock, capsys)


def _status_release_and_drain(sb: Sandbox, clock: ManualClock, capsys: pytest.CaptureFixture[str]) -> None:
    from busy_guard.cli import main

    session = EmulatedSession(sb.emulator)
    busy, legacy_busy, idle = sb.instances(GROUP)
    lease = sb.begin(busy)
    put_lease(sb.dynamodb, legacy_busy, "old_loader", "legacy-host:7", started=clock() - 60, ttl=3600)

    assert main(["status", "--asg", GROUP, "--json"], session=session, clock=clock) == 0
    rows = {row["instance_id"]: row for row in json.loads(capsys.readouterr().out)["instances"]}
    assert [rows[i]["guard_would"]["action"] for i in (busy, legacy_busy, idle)] == [
        "WAIT",
        "WAIT",
        "CONTINUE",
    ]
    assert [x["kind"] for x in rows[busy]["leases"]] == ["bulk_table_insert"]  # from the ARN item
    assert [x["kind"] for x in rows[legacy_busy]["leases"]] == ["old_loader"]  # from the bare-id item

    sb.terminate(busy)
    code = main(["release", busy, "--asg", GROUP, "--reason", "INC-7", "--yes"], session=session, clock=clock)
    assert code == 0, capsys.readouterr().err
    released = sb.item(busy).released
    assert released is not None and released.reason == "operator: INC-7"
    assert not sb.item_at(busy).exists
    Sandbox.end(lease)

    assert main(["drain", idle, "--poll", "0.2", "--", "true"], session=session, clock=clock) == 0
    drained = sb.item(idle)
    assert drained.maintenance is None and drained.last_maintenance is not None
    assert drained.last_maintenance.result == "ok" and not sb.item_at(idle).exists


# --- what reading legacy keys costs: calls, counted -----------------------------------------------
def guard_calls(
    clock: ManualClock, engine: DynamoDBLocal | None, read_legacy: str
) -> dict[str, dict[str, int]]:
    """The guard's AWS calls for one idle termination, and for one busy termination's first look and
    release, with bare-id items read or not."""
    settings = SandboxSettings(env={Env.READ_LEGACY_KEYS: read_legacy})
    with start(clock, engine, settings) as sb:
        counter = AwsCallCounter.of_guard(sb)
        idle, busy = sb.instances(GROUP)[:2]
        sb.terminate(idle)
        calls = {"idle": dict(counter.take())}
        lease = sb.begin(busy)
        sb.terminate(busy)
        calls["busy, first look"] = dict(counter.take())
        Sandbox.end(lease)
        sb.pump_stream()
        calls["busy, last lease ended"] = dict(counter.take())
        assert completions(sb, idle) == completions(sb, busy) == [("CONTINUE", "guard")]
        return calls


def test_reading_legacy_keys_costs_a_transaction_per_release_and_a_read_per_look(
    clock: ManualClock, isolated_keys: None
) -> None:
    without = guard_calls(clock, None, "false")
    assert without == {
        "idle": {"UpdateItem": 1, "CompleteLifecycleAction": 1},
        "busy, first look": {"UpdateItem": 2},
        "busy, last lease ended": {"UpdateItem": 1, "CompleteLifecycleAction": 1},
    }
    with_legacy = guard_calls(clock, None, "true")
    assert with_legacy == {
        "idle": {"TransactWriteItems": 1, "CompleteLifecycleAction": 1},
        # the refused release-if-idle reads both items again; the draining mark reads the companion
        "busy, first look": {"TransactWriteItems": 1, "BatchGetItem": 2, "UpdateItem": 1},
        "busy, last lease ended": {"TransactWriteItems": 1, "CompleteLifecycleAction": 1},
    }


@pytest.mark.parametrize(
    ("scheme", "hint"),
    [
        ("isolated", "only with its instance profile's credentials"),
        ("legacy", "a stack with KeyScheme=isolated needs BUSY_GUARD_KEY_SCHEME=isolated"),
    ],
)
def test_access_denied_says_what_the_writers_policy_allows(
    scheme: str, hint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What IAM answers a writer on the wrong item or with the wrong credentials (moto enforces no
    IAM, so the answer is stubbed): the work runs, and the log says why it is unguarded."""
    client = boto3.client("dynamodb", region_name=REGION)
    stubber = Stubber(client)
    stubber.add_client_error("update_item", service_error_code="AccessDeniedException", http_status_code=400)
    writer.reset_caches()
    with stubber, caplog.at_level(logging.WARNING, "busy_guard"):
        ran = []
        with writer.instance_busy_sync(
            arn("i-0123456789abcdef0"), "backfill", table="t.able", client=client, key_scheme=scheme
        ) as lease:
            ran.append(lease)
    assert ran == [None]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and hint in errors[0], errors
