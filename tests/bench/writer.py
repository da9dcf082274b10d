"""The writer's overhead on real work: AWS calls and wall time of ``begin`` + ``end``, and the
worst case ``begin`` can cost when the table is unreachable or hangs.

Calls are counted on the writer's client through botocore events (one per API call). Wall times are
against moto (in-process, so they are the writer's and botocore's CPU plus moto's, no network), and
against local TCP ports that behave like a dead endpoint: one that accepts connections and never
answers, one that refuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3

from busy_guard import writer
from tests.bench import _support
from tests.bench._support import AwsCalls, breakdown, heading, note, table

TABLE = "busy_guard.instance_busy"
INSTANCE = "i-0123456789abcdef0"


def run(quick: bool) -> None:
    heading("5. Writer overhead")
    pairs = 50 if quick else 200
    dead_runs = 3 if quick else 5
    with _support.fake_credentials(), _support.quiet():
        calls_rows, time_rows = _against_moto(pairs)
        dead_rows = _against_dead_endpoints(dead_runs)
    table(["operation", "AWS calls"], calls_rows, right=[1])
    table(["against moto, per operation", f"median of {pairs}", "p90"], time_rows, right=[1, 2])
    table(
        [
            "begin against",
            f"median of {dead_runs}",
            "max (1st: creates the client)",
            "HTTP attempts",
            "result",
        ],
        dead_rows,
        right=[1, 2, 3],
    )
    cfg = writer.CLIENT_CONFIG
    note(
        f"""The writer's client: connect and read timeouts {cfg.connect_timeout} s / {cfg.read_timeout} s,
        {cfg.retries["total_max_attempts"]} attempts in botocore's standard mode. A table that hangs costs
        ``begin`` two read timeouts plus one backoff (about a second), then the body runs without a
        lease; a refused connection fails at once. Over TLS (real endpoints), a handshake that never
        completes is bounded by the connect timeout the same way. ``end`` uses the same client, so
        the same bound holds; the heartbeat runs in the background and never blocks the body. The
        moto times include moto's own request handling, so they overstate the writer's cost; against
        DynamoDB each call adds a network round trip (single-digit milliseconds in-region)."""
    )


def _against_moto(pairs: int) -> tuple[list[Any], list[Any]]:
    from moto import mock_aws

    from busy_guard.sandbox.world import serialized_moto

    with serialized_moto(), mock_aws():
        client = boto3.Session(region_name="us-east-1").client("dynamodb", config=writer.CLIENT_CONFIG)
        client.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "instance_id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "instance_id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        options: dict[str, Any] = {
            "table": TABLE,
            "client": client,
            "heartbeat_interval": 3599,
            "lease_ttl": 3600,
        }
        calls = AwsCalls([client])
        calls_rows: list[Any] = []

        lease = writer.begin_destructive_op_sync(INSTANCE, "bulk_table_insert", **options)
        calls_rows.append(("begin, first lease ever on the instance (creates the leases map)", _total(calls)))
        second = writer.begin_destructive_op_sync(INSTANCE, "bulk_table_insert", **options)
        calls_rows.append(("begin, the item exists", _total(calls)))
        assert lease is not None and second is not None
        lease._writer.heartbeat(lease)
        calls_rows.append(("heartbeat (every 60 s, background)", _total(calls)))
        writer.end_destructive_op_sync(INSTANCE, second)
        calls_rows.append(("end", _total(calls)))
        writer.end_destructive_op_sync(INSTANCE, lease)
        calls.take()

        sync_pairs = []
        for _ in range(pairs):
            started = time.perf_counter()
            with writer.instance_busy_sync(INSTANCE, "bulk_table_insert", **options):
                pass
            sync_pairs.append(time.perf_counter() - started)
        per_pair = calls.take()
        calls_rows.append(
            (
                f"begin + end, averaged over {pairs} instance_busy_sync ({breakdown(per_pair)})",
                sum(per_pair.values()) / pairs,
            )
        )

        async def cycle() -> list[float]:
            spent = []
            for _ in range(pairs):
                started = time.perf_counter()
                async with writer.instance_busy(INSTANCE, "bulk_table_insert", **options):
                    pass
                spent.append(time.perf_counter() - started)
            return spent

        async_pairs = asyncio.run(cycle())
        calls.close()
    time_rows = [
        (
            "instance_busy_sync: begin + end (+ heartbeat thread)",
            _support.ms(_support.median(sync_pairs)),
            _support.ms(_support.percentile(sync_pairs, 0.9)),
        ),
        (
            "instance_busy (async): begin + end (+ heartbeat task)",
            _support.ms(_support.median(async_pairs)),
            _support.ms(_support.percentile(async_pairs, 0.9)),
        ),
    ]
    return calls_rows, time_rows


def _total(calls: AwsCalls) -> int:
    return sum(calls.take().values())


def _against_dead_endpoints(runs: int) -> list[Any]:
    rows = []
    with _silent_server() as (port, accepted):
        spent, attempts, results = _begins(f"http://127.0.0.1:{port}", runs, accepted)
        rows.append(("a port that accepts and never answers", *spent, attempts, results))
    with _closed_port() as port:
        spent, attempts, results = _begins(f"http://127.0.0.1:{port}", runs, None)
        rows.append(("a closed port (connection refused)", *spent, attempts, results))
    writer.reset_caches()
    return rows


def _begins(endpoint: str, runs: int, accepted: list[int] | None) -> tuple[tuple[str, str], str, str]:
    writer.reset_caches()
    spent: list[float] = []
    outcomes: set[str] = set()
    before = accepted[0] if accepted else 0
    for _ in range(runs):
        started = time.perf_counter()
        lease = writer.begin_destructive_op_sync(
            INSTANCE, "bulk_table_insert", table=TABLE, endpoint_url=endpoint
        )
        spent.append(time.perf_counter() - started)
        outcomes.add("no lease, body runs" if lease is None else "lease?!")
    attempts = f"{(accepted[0] - before) / runs:.0f} per begin" if accepted else "refused"
    return (
        (_support.ms(_support.median(spent)), _support.ms(max(spent))),
        attempts,
        ", ".join(sorted(outcomes)),
    )


@contextlib.contextmanager
def _silent_server() -> Iterator[tuple[int, list[int]]]:
    """A TCP server that accepts every connection and never sends a byte."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    accepted = [0]
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            accepted[0] += 1
            held.append(connection)

    thread = threading.Thread(target=serve, name="bench-silent-server", daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()


@contextlib.contextmanager
def _closed_port() -> Iterator[int]:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    yield port
