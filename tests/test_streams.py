"""Stream facts from real records, on Amazon DynamoDB Local only.

Which writes emit a stream record decides what wakes the guard, and the stack's event-source filter
decides which of those records reach it. Both are facts of the engine, so they are proven on Amazon's
own: DynamoDB Local's streams follow AWS here (a write that changes nothing emits no record; an
update that creates an item emits one INSERT), and moto's do not (it emits a record for every
successful write, changed or not, and two INSERTs when an update creates an item), so these tests do
not run on moto. AWS: "If you perform a PutItem or UpdateItem operation that does not change any data
in an item, DynamoDB Streams does not write a stream record for that operation"
(https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Streams.html).

Every write here is one the project really makes: the writer library's begin, heartbeat and end, and
the guard's own requests from ``schema``. The filter is the very pattern the CDK app installs
(``schema.stream_filter_pattern()``, passed to ``FilterCriteria.filter`` in
``infra/busy_guard_infra/constructs/guard.py``), evaluated with the sandbox's matcher of Lambda's
filter rules on records shaped as the event source delivers them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import create_busy_table

from busy_guard import schema, writer
from busy_guard.sandbox.dynamodb_local import DynamoDBLocal
from busy_guard.sandbox.world import StreamReader, _as_lambda_record, matches

NOW = 1_800_000_000.0


class Stream:
    """A streamed busy table on DynamoDB Local, and the records written since the last look."""

    def __init__(self, server: DynamoDBLocal) -> None:
        self.client = server.dynamodb()
        self.streams = server.client("dynamodbstreams")
        self.table = create_busy_table(
            self.client, f"busy_guard.streams-{uuid.uuid4().hex[:12]}", stream=True
        )
        self.arn = self.client.describe_table(TableName=self.table)["Table"]["LatestStreamArn"]
        self._reader = StreamReader(self.streams, self.arn)

    def new_records(self) -> list[dict[str, Any]]:
        return self._reader.new_records()

    def events(self) -> list[str]:
        return [record["eventName"] for record in self.new_records()]

    def update(self, instance: str, request: schema.UpdateRequest) -> Any:
        return self.client.update_item(TableName=self.table, Key=schema.key(instance), **request)

    def begin(self, instance: str, kind: str = "bulk_table_insert") -> writer.LeaseHandle:
        lease = writer.begin_destructive_op_sync(
            instance, kind, table=self.table, client=self.client, heartbeat_interval=3000, lease_ttl=3600
        )
        assert lease is not None
        return lease


@pytest.fixture
def stream(dynamodb_local: DynamoDBLocal) -> Iterator[Stream]:
    made = Stream(dynamodb_local)
    yield made
    made.client.delete_table(TableName=made.table)


def draining(asg: str = "graph-db") -> schema.Draining:
    return schema.Draining(since=NOW, asg=asg, hook="busy-guard")


def released() -> schema.Released:
    return schema.Released(at=NOW + 60, reason="idle", by="guard")


def admitted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in records if matches(schema.stream_filter_pattern(), record)]


# --- which writes emit a record -----------------------------------------------------------------------
def test_every_real_change_emits_one_record_and_a_write_that_changes_nothing_none(stream: Stream) -> None:
    instance = "i-0123456789abcdef0"
    lease = stream.begin(instance)  # the first begin creates the item: one INSERT, not two
    assert stream.events() == ["INSERT"]
    assert writer._Writer.configure(table=stream.table, client=stream.client).heartbeat(lease)
    assert stream.events() == ["MODIFY"]  # a renewal changes the lease's times
    stream.update(instance, schema.mark_draining_update(draining()))
    assert stream.events() == ["MODIFY"]  # the guard's first look marks the item
    for _ in range(3):
        stream.update(instance, schema.mark_draining_update(draining()))
    assert stream.events() == []  # later looks keep the first `since`: no change, no record
    stream.update(instance, schema.counter_probe_update())  # the writer's repair probe on a number
    assert stream.events() == []
    writer.end_destructive_op_sync(instance, lease)
    assert stream.events() == ["MODIFY"]
    with pytest.raises(stream.client.exceptions.ConditionalCheckFailedException):
        stream.update(instance, schema.end_update(lease.lease_id, kind="k", now=NOW))  # a refused write
    assert stream.events() == []
    stream.update(instance, schema.release_update(released(), ttl=NOW + 86400, draining_since=NOW))
    assert stream.events() == ["MODIFY"]


def test_the_guards_look_at_an_item_that_does_not_exist_inserts_it_once(stream: Stream) -> None:
    instance = "i-0fedcba9876543210"
    stream.update(instance, schema.mark_draining_update(draining()))
    stream.update(instance, schema.mark_draining_update(draining()))
    assert stream.events() == ["INSERT"]


# --- what the filter admits ------------------------------------------------------------------------------
def test_the_filter_admits_exactly_the_last_lease_ending_on_a_draining_unreleased_item(
    stream: Stream,
) -> None:
    """Every record of a full life, labelled; only the one where the last lease of a draining item
    ends may wake the guard."""
    instance = "i-0aaaaaaaaaaaaaaa1"
    seen: list[tuple[str, bool]] = []

    def step(label: str) -> None:
        records = stream.new_records()
        assert records, f"{label}: expected a record"
        seen.extend((label, bool(admitted([record]))) for record in records)

    first = stream.begin(instance)
    step("begin of the first lease")
    second = stream.begin(instance, "materialization")
    step("begin of a second lease")
    writer.end_destructive_op_sync(instance, first)
    step("end of one lease, one left, not draining")
    stream.update(instance, schema.mark_draining_update(draining()))
    step("the guard's first look (marks draining)")
    assert writer._Writer.configure(table=stream.table, client=stream.client).heartbeat(second)
    step("heartbeat on a draining item")
    writer.end_destructive_op_sync(instance, second)
    step("end of the last lease on a draining item")
    stream.update(instance, schema.release_update(released(), ttl=NOW + 86400, draining_since=NOW))
    step("the guard's release")
    stream.update(instance, schema.confirm_release_update(NOW + 60, now=NOW + 120))
    step("the guard's confirmation of the release")
    assert seen == [
        ("begin of the first lease", False),
        ("begin of a second lease", False),
        ("end of one lease, one left, not draining", False),
        ("the guard's first look (marks draining)", False),
        ("heartbeat on a draining item", False),
        ("end of the last lease on a draining item", True),
        ("the guard's release", False),
        ("the guard's confirmation of the release", False),
    ]


def test_the_filter_ignores_the_last_lease_ending_on_an_item_that_is_not_draining(stream: Stream) -> None:
    instance = "i-0aaaaaaaaaaaaaaa2"
    lease = stream.begin(instance)
    writer.end_destructive_op_sync(instance, lease)
    records = stream.new_records()
    assert [r["eventName"] for r in records] == ["INSERT", "MODIFY"]
    assert admitted(records) == []


def test_the_filter_ignores_the_last_lease_ending_after_the_release(stream: Stream) -> None:
    """A lease the guard released over (stale, max_wait) that ends later: the item is released, not
    draining, so nothing wakes the guard for a termination it already finished."""
    instance = "i-0aaaaaaaaaaaaaaa3"
    lease = stream.begin(instance)
    stream.update(instance, schema.mark_draining_update(draining()))
    stream.update(instance, schema.release_update(released(), ttl=NOW + 86400, draining_since=NOW))
    stream.new_records()
    writer.end_destructive_op_sync(instance, lease)
    records = stream.new_records()
    assert [r["eventName"] for r in records] == ["MODIFY"]
    assert admitted(records) == []


def test_the_filter_admits_a_pruned_orphan_that_was_the_last_lease_of_a_draining_item(stream: Stream) -> None:
    """The counter reaching 0 by a prune is the last lease ending too: the guard must hear it."""
    instance = "i-0aaaaaaaaaaaaaaa4"
    orphan = schema.Lease("orphan", "k", "h", NOW - 7200, NOW - 7200, NOW - 7000)
    stream.client.put_item(
        TableName=stream.table,
        Item={
            "instance_id": {"S": instance},
            "leases": {"M": {orphan.lease_id: schema.lease_value(orphan)}},
            "active_destructive_ops": {"N": "1"},
        },
    )
    stream.update(instance, schema.mark_draining_update(draining()))
    stream.new_records()
    stream.update(instance, schema.prune_lease_update(orphan))
    records = stream.new_records()
    assert len(admitted(records)) == 1


def test_an_idle_items_release_never_matches(stream: Stream) -> None:
    """The guard's one-write release of an idle instance (no counter yet) and of one whose counter
    is already 0: neither has a counter going from non-zero to 0."""
    for instance, counter in (("i-0aaaaaaaaaaaaaaa5", None), ("i-0aaaaaaaaaaaaaaa6", "0")):
        item: dict[str, Any] = {"instance_id": {"S": instance}}
        if counter is not None:
            item["active_destructive_ops"] = {"N": counter}
        stream.client.put_item(TableName=stream.table, Item=item)
        stream.update(instance, schema.release_if_idle_update(released(), ttl=NOW + 86400, not_before=NOW))
    records = stream.new_records()
    assert [r["eventName"] for r in records] == ["INSERT", "MODIFY", "INSERT", "MODIFY"]
    assert admitted(records) == []


# --- the record shape ------------------------------------------------------------------------------------
def test_dynamodb_local_writes_an_empty_map_untyped_and_the_adapter_types_it(stream: Stream) -> None:
    """DynamoDB Local's stream record carries the emptied ``leases`` map as ``{}`` where the item
    (and AWS's stream, whose AttributeValue always names its one type:
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_streams_AttributeValue.html)
    has ``{"M": {}}``. The sandbox's adapter reads it as the empty map; the guard's parser keeps
    calling an untyped value unreadable (see test_schema)."""
    instance = "i-0aaaaaaaaaaaaaaa7"
    lease = stream.begin(instance)
    writer.end_destructive_op_sync(instance, lease)
    raw = [
        record
        for shard in stream.streams.describe_stream(StreamArn=stream.arn)["StreamDescription"]["Shards"]
        for record in stream.streams.get_records(
            ShardIterator=stream.streams.get_shard_iterator(
                StreamArn=stream.arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
        )["Records"]
    ]
    assert raw[-1]["dynamodb"]["NewImage"]["leases"] == {}  # the engine's quirk, as read
    item = stream.client.get_item(TableName=stream.table, Key=schema.key(instance))["Item"]
    assert item["leases"] == {"M": {}}
    delivered = _as_lambda_record(raw[-1], stream.arn)
    assert delivered["dynamodb"]["NewImage"]["leases"] == {"M": {}}
    state = schema.parse_item(delivered["dynamodb"]["NewImage"], instance)
    assert state.problems == () and state.leases == () and state.counter == 0
