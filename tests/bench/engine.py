"""Two figures on Amazon DynamoDB Local (the real engine, over loopback HTTP):

- the writer's ``begin`` + ``end`` against two bare ``UpdateItem`` calls on the same item: the
  physical floor of a lease is two round trips, so the ratio is what the library adds on top
  (condition evaluation, the heartbeat thread's start and join, parsing the returned item);
- how soon the stream record of "the last lease ended" can be read after ``end`` returns: the
  engine's part of the stream fast path, polled as fast as GetRecords answers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from busy_guard import schema, writer
from busy_guard.sandbox.dynamodb_local import DynamoDBLocal
from tests.bench import _support
from tests.bench._support import heading, median, ms, note, percentile, table

INSTANCE = "i-0123456789abcdef0"
POLL_DEADLINE = 10.0  # seconds: a record not readable by then is reported as missing, never waited on


def run(quick: bool) -> None:
    heading("6. On Amazon DynamoDB Local")
    pairs = 50 if quick else 300
    samples = 20 if quick else 100
    started = time.perf_counter()
    server = DynamoDBLocal.start()
    start_took = time.perf_counter() - started
    try:
        client = server.dynamodb()
        with _support.quiet():
            lease_times, bare_times = _lease_against_bare(client, pairs)
            delays, missing = _stream_delay(server, samples)
    finally:
        server.stop()
    lease, bare = median(lease_times), median(bare_times)
    table(
        ["per lease", f"median of {pairs}", "p90"],
        [
            ("begin + end (the writer, sync API)", ms(lease), ms(percentile(lease_times, 0.9))),
            ("two bare UpdateItem calls (the floor)", ms(bare), ms(percentile(bare_times, 0.9))),
            ("ratio", f"{lease / bare:.2f}x", ""),
        ],
        right=[1, 2],
    )
    table(
        ["last lease ended -> its stream record readable", f"of {samples}"],
        [
            ("median", ms(median(delays)) if delays else "-"),
            ("p90", ms(percentile(delays, 0.9)) if delays else "-"),
            ("max", ms(max(delays)) if delays else "-"),
            ("records never readable (10 s deadline)", str(missing)),
        ],
        right=[1],
    )
    note(
        f"""DynamoDB Local started in {start_took:.1f} s. Lease pairs run on an item that already has its
        ``leases`` map (the steady state: one UpdateItem each for begin and end); the bare calls are
        ``SET`` of one number on the same item with the same client. The stream delay is measured
        from ``end`` returning to the first GetRecords (on an iterator taken before the end, polled
        back to back) that returns the record; on AWS, Lambda's event source adds its own polling of
        the shard on top of the engine's delay."""
    )


def _lease_against_bare(client: Any, pairs: int) -> tuple[list[float], list[float]]:
    table_name = _streamed_table(client, stream=False)
    options: writer.WriterOptions = {
        "table": table_name,
        "client": client,
        "heartbeat_interval": 3000.0,
        "lease_ttl": 3600.0,
    }
    warm = writer.begin_destructive_op_sync(INSTANCE, "bench", **options)  # creates the map
    writer.end_destructive_op_sync(INSTANCE, warm)
    lease_times: list[float] = []
    bare_times: list[float] = []
    bare = {
        "UpdateExpression": "SET #v = :v",
        "ExpressionAttributeNames": {"#v": "bench_value"},
    }
    for number in range(pairs):
        begun = time.perf_counter()
        lease = writer.begin_destructive_op_sync(INSTANCE, "bench", **options)
        writer.end_destructive_op_sync(INSTANCE, lease)
        lease_times.append(time.perf_counter() - begun)
        assert lease is not None
        begun = time.perf_counter()
        for half in (0, 1):
            value = {":v": schema.num(2 * number + half)}
            client.update_item(
                TableName=table_name, Key=schema.key(INSTANCE), ExpressionAttributeValues=value, **bare
            )
        bare_times.append(time.perf_counter() - begun)
    client.delete_table(TableName=table_name)
    return lease_times, bare_times


def _stream_delay(server: DynamoDBLocal, samples: int) -> tuple[list[float], int]:
    client = server.dynamodb()
    streams = server.client("dynamodbstreams")
    table_name = _streamed_table(client, stream=True)
    arn = client.describe_table(TableName=table_name)["Table"]["LatestStreamArn"]
    options: writer.WriterOptions = {
        "table": table_name,
        "client": client,
        "heartbeat_interval": 3000.0,
        "lease_ttl": 3600.0,
    }
    delays: list[float] = []
    missing = 0
    for number in range(samples):
        instance = f"i-{number:017x}"
        lease = writer.begin_destructive_op_sync(instance, "bench", **options)
        assert lease is not None
        draining = schema.Draining(since=time.time(), asg="bench", hook="busy-guard")
        client.update_item(
            TableName=table_name, Key=schema.key(instance), **schema.mark_draining_update(draining)
        )
        iterators = [
            streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="LATEST")[
                "ShardIterator"
            ]
            for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
        ]
        writer.end_destructive_op_sync(instance, lease)
        ended = time.perf_counter()
        delay = _first_matching_record(streams, iterators, instance, ended)
        if delay is None:
            missing += 1
        else:
            delays.append(delay)
    client.delete_table(TableName=table_name)
    return delays, missing


def _first_matching_record(streams: Any, iterators: list[str], instance: str, ended: float) -> float | None:
    while time.perf_counter() - ended < POLL_DEADLINE:
        for position, iterator in enumerate(iterators):
            page = streams.get_records(ShardIterator=iterator)
            iterators[position] = page.get("NextShardIterator") or iterator
            for record in page["Records"]:
                new = record["dynamodb"].get("NewImage", {})
                if new.get(schema.INSTANCE_ID) == {"S": instance} and new.get(schema.COUNTER) == {"N": "0"}:
                    return time.perf_counter() - ended
    return None


def _streamed_table(client: Any, *, stream: bool) -> str:
    name = f"busy_guard.bench-{uuid.uuid4().hex[:12]}"
    extra: dict[str, Any] = {}
    if stream:
        extra["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
    client.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": schema.INSTANCE_ID, "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": schema.INSTANCE_ID, "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
        **extra,
    )
    return name
