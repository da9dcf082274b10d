"""The writer library on both engines (moto and Amazon DynamoDB Local): real boto3 calls, failures
injected through botocore events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from conftest import Engine

import busy_guard
from busy_guard import (
    InstanceDrainingError,
    begin_destructive_op,
    begin_destructive_op_sync,
    end_destructive_op,
    end_destructive_op_sync,
    identity,
    instance_busy,
    instance_busy_sync,
    schema,
    settings,
    writer,
)
from busy_guard.decision import Action, DecisionConfig, Reason, decide
from busy_guard.sandbox.clock import ManualClock

INSTANCE = "i-0123456789abcdef0"
LOGGER = "busy_guard.writer"


@pytest.fixture
def dynamodb(engine: Engine) -> Any:
    """Every test that touches the table runs on moto and on DynamoDB Local."""
    return engine.client


@pytest.fixture
def busy_table(engine: Engine) -> str:
    return engine.table


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    writer.reset_caches()
    identity.reset_caches()
    yield
    writer.reset_caches()
    identity.reset_caches()


# --- helpers --------------------------------------------------------------------------------------
def item_of(dynamodb: Any, table: str, instance: str = INSTANCE) -> dict[str, Any] | None:
    item: dict[str, Any] | None = dynamodb.get_item(
        TableName=table, Key=schema.key(instance), ConsistentRead=True
    ).get("Item")
    return item


def state_of(dynamodb: Any, table: str, instance: str = INSTANCE) -> schema.BusyState:
    return schema.parse_item(item_of(dynamodb, table, instance), instance)


def assert_consistent(dynamodb: Any, table: str, leases: int) -> None:
    """The invariant after every step: the counter equals the number of leases."""
    state = state_of(dynamodb, table)
    assert len(state.leases) == leases
    assert state.counter == leases
    assert state.corrupt_leases == 0


def update_params(request_dict: dict[str, Any]) -> dict[str, Any]:
    """The UpdateItem parameters inside a ``before-call`` event's serialized request."""
    body = request_dict["body"]
    params: dict[str, Any] = json.loads(body.decode() if isinstance(body, bytes) else body)
    return params


def error_response(code: str, message: str, status: int = 400) -> tuple[AWSResponse, dict[str, Any]]:
    http = AWSResponse("https://dynamodb.us-east-1.amazonaws.com/", status, {}, None)  # type: ignore[arg-type]
    return http, {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


def inject(
    client: Any,
    code: str,
    message: str,
    *,
    when: Callable[[dict[str, Any]], bool] = lambda params: True,
    times: int = 1,
) -> list[dict[str, Any]]:
    """Make the next ``times`` UpdateItem calls matching ``when`` fail with ``code`` before they leave
    the client (what AWS would answer). Returns the list of failed calls' parameters."""
    failed: list[dict[str, Any]] = []

    def handler(params: dict[str, Any], **_: Any) -> Any:
        if len(failed) < times and when(update_params(params)):
            failed.append(update_params(params))
            return error_response(code, message)
        return None

    client.meta.events.register("before-call.dynamodb.UpdateItem", handler)
    return failed


def record_calls(client: Any) -> list[str]:
    """UpdateExpressions of every UpdateItem the client sends."""
    calls: list[str] = []

    def handler(params: dict[str, Any], **_: Any) -> None:
        calls.append(update_params(params)["UpdateExpression"])

    client.meta.events.register("before-call.dynamodb.UpdateItem", handler)
    return calls


def is_begin(params: dict[str, Any]) -> bool:
    return "ADD #count :one" in params["UpdateExpression"]


def is_heartbeat(params: dict[str, Any]) -> bool:
    return "#hb" in params["UpdateExpression"]


def is_end(params: dict[str, Any]) -> bool:
    return "REMOVE #leases.#id" in params["UpdateExpression"]


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# --- the public surface ---------------------------------------------------------------------------
def test_public_names() -> None:
    for name in (
        "instance_busy",
        "instance_busy_sync",
        "begin_destructive_op",
        "end_destructive_op",
        "begin_destructive_op_sync",
        "end_destructive_op_sync",
        "InstanceDrainingError",
    ):
        assert callable(getattr(busy_guard, name))
    assert [
        busy_guard.OP_KIND_MATERIALIZATION,
        busy_guard.OP_KIND_DAGSTER_MATERIALIZATION,
        busy_guard.OP_KIND_SEC_STAGING,
        busy_guard.OP_KIND_EXTENSIONS_MATERIALIZE,
        busy_guard.OP_KIND_BULK_TABLE_CREATE,
        busy_guard.OP_KIND_BULK_TABLE_INSERT,
    ] == [
        "materialization",
        "dagster_materialization",
        "sec_staging",
        "extensions_materialize",
        "bulk_table_create",
        "bulk_table_insert",
    ]


def test_import_makes_no_network_call() -> None:
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network call at import')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import busy_guard, busy_guard.writer\n"
        "assert not busy_guard.writer._clients\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- begin / end / heartbeat: item contents -------------------------------------------------------
def test_begin_and_end_write_the_documented_item(dynamodb: Any, busy_table: str, clock: ManualClock) -> None:
    with instance_busy_sync(
        INSTANCE, busy_guard.OP_KIND_BULK_TABLE_INSERT, table=busy_table, client=dynamodb, clock=clock
    ) as lease:
        assert lease is not None
        assert (lease.instance_id, lease.kind, lease.table) == (INSTANCE, "bulk_table_insert", busy_table)
        item = item_of(dynamodb, busy_table)
        assert item == {
            "instance_id": {"S": INSTANCE},
            "leases": {
                "M": {
                    lease.lease_id: {
                        "M": {
                            "kind": {"S": "bulk_table_insert"},
                            "holder": {"S": f"{socket.gethostname()}:{os.getpid()}"},
                            "started_at": {"N": "1800000000"},
                            "heartbeat_at": {"N": "1800000000"},
                            "expires_at": {"N": "1800000180"},
                        }
                    }
                }
            },
            "active_destructive_ops": {"N": "1"},
            "last_destructive_op_at": {"S": "2027-01-15T08:00:00Z"},
            "last_destructive_op_kind": {"S": "bulk_table_insert"},
        }
        assert len(lease.lease_id) == 32
        clock.advance(42)
    assert item_of(dynamodb, busy_table) == {
        "instance_id": {"S": INSTANCE},
        "leases": {"M": {}},
        "active_destructive_ops": {"N": "0"},
        "last_destructive_op_at": {"S": "2027-01-15T08:00:42Z"},
        "last_destructive_op_kind": {"S": "bulk_table_insert"},
    }


def test_counter_equals_lease_count_after_every_step(
    dynamodb: Any, busy_table: str, clock: ManualClock
) -> None:
    kinds = ["sec_staging", "bulk_table_create", "a-kind-nobody-planned"]
    handles = []
    for number, kind in enumerate(kinds, start=1):
        handle = begin_destructive_op_sync(INSTANCE, kind, table=busy_table, client=dynamodb, clock=clock)
        assert handle is not None
        handles.append(handle)
        assert_consistent(dynamodb, busy_table, number)
    assert sorted(lease.kind for lease in state_of(dynamodb, busy_table).leases) == sorted(kinds)
    for remaining, handle in zip((2, 1, 0), (handles[1], handles[0], handles[2]), strict=True):
        end_destructive_op_sync(INSTANCE, handle)
        assert_consistent(dynamodb, busy_table, remaining)
        assert handle.lease_id not in {lease.lease_id for lease in state_of(dynamodb, busy_table).leases}


def test_async_begin_and_end(dynamodb: Any, busy_table: str, clock: ManualClock) -> None:
    async def main() -> None:
        lease = await begin_destructive_op(
            INSTANCE, "sec_staging", table=busy_table, client=dynamodb, clock=clock
        )
        assert lease is not None and lease.heartbeat_running
        assert_consistent(dynamodb, busy_table, 1)
        await end_destructive_op(INSTANCE, lease)
        assert not lease.heartbeat_running
        assert_consistent(dynamodb, busy_table, 0)
        await end_destructive_op(INSTANCE, None)  # a lease that was never taken

    asyncio.run(main())
    end_destructive_op_sync(INSTANCE, None)


def test_table_and_instance_from_the_environment(
    busy_table: str, dynamodb: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUSY_GUARD_TABLE", busy_table)
    monkeypatch.setenv("BUSY_GUARD_INSTANCE_ID", INSTANCE)
    with instance_busy_sync() as lease:  # the library's own cached client, on moto
        assert lease is not None
        assert (lease.instance_id, lease.kind) == (INSTANCE, "materialization")
        assert_consistent(dynamodb, busy_table, 1)
    assert_consistent(dynamodb, busy_table, 0)


def test_shared_client_is_lazy_cached_and_short_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not writer._clients
    client = writer._shared_client(None)
    assert writer._shared_client(None) is client
    assert writer._shared_client("http://127.0.0.1:1") is not client
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert writer._shared_client(None).meta.region_name == "eu-west-1"
    config = client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (0.5, 0.5)
    assert config.retries == {"total_max_attempts": 2, "mode": "standard"}
    assert config.max_pool_connections == settings.WRITER_MAX_POOL_CONNECTIONS


# --- the first begin on the items that can exist --------------------------------------------------
def test_first_begin_on_a_brand_new_item(dynamodb: Any, busy_table: str) -> None:
    calls = record_calls(dynamodb)
    with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb) as lease:
        assert lease is not None
        assert_consistent(dynamodb, busy_table, 1)
    assert len(calls) == 3  # add (fails: no map), create the map, end
    assert_consistent(dynamodb, busy_table, 0)


def test_first_begin_on_an_item_the_guard_marked_draining(dynamodb: Any, busy_table: str) -> None:
    draining = schema.Draining(since=1_700_000_000, asg="web-asg", hook="busy-guard")
    dynamodb.update_item(
        TableName=busy_table, Key=schema.key(INSTANCE), **schema.mark_draining_update(draining)
    )
    before = item_of(dynamodb, busy_table)
    ran = False
    with pytest.raises(InstanceDrainingError) as refused:  # noqa: SIM117 - the raise is the point
        with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb):
            ran = True
    assert not ran
    assert refused.value.instance_id == INSTANCE
    assert refused.value.draining == draining
    assert "web-asg" in str(refused.value) and "busy-guard" in str(refused.value)
    assert item_of(dynamodb, busy_table) == before


def test_first_begin_after_a_release_from_an_older_boot(dynamodb: Any, busy_table: str) -> None:
    """A warm-pool instance back from a stop: the old mark must not refuse, and begin removes it
    together with the TTL so the item of a live instance is never deleted."""
    released = schema.Released(at=identity.boot_time() - 3600, reason="idle", by="guard")
    dynamodb.update_item(
        TableName=busy_table,
        Key=schema.key(INSTANCE),
        **schema.release_update(released, ttl=time.time() + 86400, draining_since=None),
    )
    with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb) as lease:
        assert lease is not None
        state = state_of(dynamodb, busy_table)
        assert state.released is None and state.expires_at is None
        assert_consistent(dynamodb, busy_table, 1)


def test_begin_refused_after_a_release_in_this_boot(dynamodb: Any, busy_table: str) -> None:
    released = schema.Released(at=time.time(), reason="idle", by="guard")
    dynamodb.update_item(
        TableName=busy_table,
        Key=schema.key(INSTANCE),
        **schema.release_update(released, ttl=time.time() + 86400, draining_since=None),
    )
    with pytest.raises(InstanceDrainingError, match="released for termination"):
        begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb)
    assert state_of(dynamodb, busy_table).leases == ()


def test_first_begin_on_a_legacy_counter_item(dynamodb: Any, busy_table: str) -> None:
    dynamodb.put_item(
        TableName=busy_table,
        Item={
            "instance_id": {"S": INSTANCE},
            "active_destructive_ops": {"N": "0"},
            "last_destructive_op_at": {"S": "2024-05-01T10:00:00+00:00"},
        },
    )
    with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb):
        assert_consistent(dynamodb, busy_table, 1)
    assert_consistent(dynamodb, busy_table, 0)


def test_begin_treats_an_invalid_document_path_as_a_missing_map(dynamodb: Any, busy_table: str) -> None:
    """How real DynamoDB may answer ``SET leases.#id`` on an item without the map."""
    failed = inject(
        dynamodb,
        "ValidationException",
        "The document path provided in the update expression is invalid for update",
        when=is_begin,
    )
    with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb) as lease:
        assert lease is not None
        assert_consistent(dynamodb, busy_table, 1)
    assert len(failed) == 1


def test_begin_gives_up_on_an_unreadable_release_mark_and_runs_the_body(
    dynamodb: Any, busy_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``released`` without a readable time fails begin's condition every time, yet does not say
    the instance is draining: bounded tries, then the body runs without a lease."""
    dynamodb.put_item(
        TableName=busy_table, Item={"instance_id": {"S": INSTANCE}, "released": {"S": "garbage"}}
    )
    calls = record_calls(dynamodb)
    ran = False
    with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb) as lease:
        ran = True
        assert lease is None
    assert ran
    assert len(calls) == 3  # bounded
    logged = warnings_in(caplog)
    assert len(logged) == 1 and "gave up" in logged[0] and "released is unreadable" in logged[0]


def test_a_retried_begin_whose_first_attempt_landed_counts_once(dynamodb: Any, busy_table: str) -> None:
    """A lost response: botocore resends a begin that DynamoDB had applied. The lease must count
    once, both when the retry is of the create-the-map form and of the add-to-the-map form."""
    retried: list[int] = []

    def retry_first_successful_begin(response: Any, request_dict: dict[str, Any], **_: Any) -> float | None:
        body = request_dict["body"]
        body = body.decode() if isinstance(body, bytes) else body
        if response is not None and response[0].status_code == 200 and ":one" in body and len(retried) < 2:
            retried.append(1)
            return 0.0  # botocore sleeps this long and sends the same request again
        return None

    dynamodb.meta.events.register("needs-retry.dynamodb.UpdateItem", retry_first_successful_begin)
    first = begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb)
    assert first is not None and len(retried) == 1
    assert_consistent(dynamodb, busy_table, 1)
    second = begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb)
    assert second is not None and len(retried) == 2
    assert_consistent(dynamodb, busy_table, 2)
    end_destructive_op_sync(INSTANCE, first)
    end_destructive_op_sync(INSTANCE, second)
    assert_consistent(dynamodb, busy_table, 0)


# --- lost begins never drive the counter negative -------------------------------------------------
def test_end_of_a_lease_that_is_not_there_leaves_zero_not_minus_one(
    dynamodb: Any, busy_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    first = begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb)
    second = begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb)
    assert first is not None and second is not None
    end_destructive_op_sync(INSTANCE, first)
    end_destructive_op_sync(INSTANCE, first)  # its begin "lost": not on the item any more
    assert_consistent(dynamodb, busy_table, 1)
    end_destructive_op_sync(INSTANCE, second)
    end_destructive_op_sync(INSTANCE, second)
    assert_consistent(dynamodb, busy_table, 0)
    assert not warnings_in(caplog)  # an expected case, logged at info
    assert any("nothing to remove" in r.getMessage() for r in caplog.records)


def test_end_after_the_item_vanished_creates_nothing(dynamodb: Any, busy_table: str) -> None:
    lease = begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb)
    dynamodb.delete_item(TableName=busy_table, Key=schema.key(INSTANCE))
    end_destructive_op_sync(INSTANCE, lease)
    assert item_of(dynamodb, busy_table) is None


# --- concurrency ----------------------------------------------------------------------------------
def test_fifty_concurrent_tasks_leave_zero(dynamodb: Any, busy_table: str) -> None:
    active = peak = 0

    async def operation(number: int) -> None:
        nonlocal active, peak
        async with instance_busy(INSTANCE, f"kind-{number % 3}", table=busy_table, client=dynamodb) as lease:
            assert lease is not None
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(random.uniform(0, 0.05))
            active -= 1

    async def main() -> None:
        await asyncio.gather(*(operation(number) for number in range(50)))

    asyncio.run(main())
    assert peak > 1  # they really overlapped
    assert_consistent(dynamodb, busy_table, 0)


def test_eight_threads_of_fifty_operations_leave_zero(dynamodb: Any, busy_table: str) -> None:
    done = threading.Event()
    snapshots: list[tuple[int | None, int]] = []
    errors: list[BaseException] = []

    def monitor() -> None:  # every read is one atomic snapshot: the invariant must hold in each
        while not done.is_set():
            state = state_of(dynamodb, busy_table)
            if state.exists:
                snapshots.append((state.counter, len(state.leases)))
            time.sleep(0.05)  # leave the (serialized) table to the workers most of the time

    def worker(number: int) -> None:
        try:
            for _ in range(50):
                with instance_busy_sync(
                    INSTANCE, f"kind-{number}", table=busy_table, client=dynamodb
                ) as lease:
                    assert lease is not None
        except BaseException as err:
            errors.append(err)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    workers = [threading.Thread(target=worker, args=(number,)) for number in range(8)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    done.set()
    watcher.join()
    assert not errors
    assert snapshots and all(counter == leases for counter, leases in snapshots)
    assert max(leases for _, leases in snapshots) > 1
    assert_consistent(dynamodb, busy_table, 0)


# --- draining -------------------------------------------------------------------------------------
def mark_draining(dynamodb: Any, table: str) -> None:
    draining = schema.Draining(since=time.time(), asg="web-asg", hook="busy-guard")
    dynamodb.update_item(TableName=table, Key=schema.key(INSTANCE), **schema.mark_draining_update(draining))


def test_draining_refuses_new_leases_but_running_ones_end_normally(dynamodb: Any, busy_table: str) -> None:
    running = begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb)
    mark_draining(dynamodb, busy_table)
    with pytest.raises(InstanceDrainingError):
        begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb)

    async def refused_async() -> None:
        async with instance_busy(INSTANCE, "k", table=busy_table, client=dynamodb):
            pytest.fail("the body must not run")

    with pytest.raises(InstanceDrainingError):
        asyncio.run(refused_async())
    assert_consistent(dynamodb, busy_table, 1)
    end_destructive_op_sync(INSTANCE, running)
    assert_consistent(dynamodb, busy_table, 0)
    assert state_of(dynamodb, busy_table).draining is not None


def test_on_draining_warn_runs_the_body_without_a_lease(
    dynamodb: Any, busy_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    mark_draining(dynamodb, busy_table)
    ran = []
    with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb, on_draining="warn") as lease:
        ran.append(lease)

    async def main() -> None:
        async with instance_busy(
            INSTANCE, "k", table=busy_table, client=dynamodb, on_draining="warn"
        ) as lease:
            ran.append(lease)

    asyncio.run(main())
    assert ran == [None, None]
    assert state_of(dynamodb, busy_table).counter is None
    assert sum("runs anyway" in message for message in warnings_in(caplog)) == 2


# --- heartbeat ------------------------------------------------------------------------------------
def lease_on_item(dynamodb: Any, table: str, lease_id: str) -> schema.Lease | None:
    return next((lease for lease in state_of(dynamodb, table).leases if lease.lease_id == lease_id), None)


def test_sync_heartbeat_renews_the_lease(dynamodb: Any, busy_table: str, clock: ManualClock) -> None:
    start = clock.now
    with instance_busy_sync(
        INSTANCE, "k", table=busy_table, client=dynamodb, clock=clock, heartbeat_interval=0.05, lease_ttl=1.0
    ) as lease:
        assert lease is not None
        first = lease_on_item(dynamodb, busy_table, lease.lease_id)
        assert first is not None and first.expires_at == start + 1.0
        clock.advance(600)  # ten minutes of work
        wait_until(
            lambda: (
                getattr(lease_on_item(dynamodb, busy_table, lease.lease_id), "heartbeat_at", 0) == clock.now
            )
        )
        renewed = lease_on_item(dynamodb, busy_table, lease.lease_id)
        assert renewed is not None
        assert (renewed.started_at, renewed.heartbeat_at, renewed.expires_at) == (
            start,
            start + 600,
            start + 601,
        )
        assert state_of(dynamodb, busy_table).last_op_at == start + 600
        assert_consistent(dynamodb, busy_table, 1)  # a heartbeat never counts


@pytest.mark.parametrize("blocking_body", [False, True], ids=["awaiting-body", "blocking-body"])
def test_async_heartbeat_renews_the_lease(
    dynamodb: Any, busy_table: str, clock: ManualClock, blocking_body: bool
) -> None:
    """Also when the body does sync work inside ``async with`` (a blocking driver call): a lease
    that lapsed while the work runs would let the guard release a busy instance."""

    async def main() -> None:
        async with instance_busy(
            INSTANCE,
            "k",
            table=busy_table,
            client=dynamodb,
            clock=clock,
            heartbeat_interval=0.05,
            lease_ttl=1.0,
        ) as lease:
            assert lease is not None
            clock.advance(600)
            for _ in range(300):
                current = lease_on_item(dynamodb, busy_table, lease.lease_id)
                if current is not None and current.heartbeat_at == clock.now:
                    break
                if blocking_body:
                    time.sleep(0.01)  # the event loop does not run meanwhile
                else:
                    await asyncio.sleep(0.01)
            assert current is not None and current.expires_at == clock.now + 1.0

    asyncio.run(main())
    assert_consistent(dynamodb, busy_table, 0)


def test_a_lease_without_heartbeat_expires_and_the_guard_sees_it_stale(
    dynamodb: Any, busy_table: str, clock: ManualClock
) -> None:
    lease = begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb, clock=clock)
    assert lease is not None
    lease._stop_heartbeat()  # the process "crashed": no heartbeat, no end
    config = DecisionConfig()
    assert decide(state_of(dynamodb, busy_table), config, clock.advance(170)).reason is Reason.BUSY
    # Past expiry plus the clock-skew allowance: stale, the guard may continue.
    decision = decide(state_of(dynamodb, busy_table), config, clock.advance(10 + config.clock_skew + 1))
    assert (decision.action, decision.reason, decision.stale_markers) == (Action.CONTINUE, Reason.STALE, 1)


@pytest.mark.parametrize("body_fails", [False, True])
def test_heartbeat_stops_when_the_body_ends(dynamodb: Any, busy_table: str, body_fails: bool) -> None:
    calls = record_calls(dynamodb)
    handle = None
    with pytest.raises(KeyError) if body_fails else contextlib.nullcontext():  # noqa: SIM117
        with instance_busy_sync(
            INSTANCE, "k", table=busy_table, client=dynamodb, heartbeat_interval=0.02
        ) as lease:
            handle = lease
            wait_until(lambda: sum("#hb" in call for call in calls) >= 2)
            if body_fails:
                raise KeyError("body")
    assert handle is not None and handle._thread is not None
    handle._thread.join(timeout=1)
    assert not handle.heartbeat_running
    count = len(calls)
    time.sleep(0.2)  # ten intervals
    assert len(calls) == count


def test_async_heartbeat_stops_on_cancellation_and_the_lease_is_released(
    dynamodb: Any, busy_table: str
) -> None:
    handles: list[Any] = []

    async def work(started: asyncio.Event) -> None:
        async with instance_busy(
            INSTANCE, "k", table=busy_table, client=dynamodb, heartbeat_interval=0.02
        ) as lease:
            handles.append(lease)
            started.set()
            await asyncio.sleep(30)

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(work(started))
        await started.wait()
        assert_consistent(dynamodb, busy_table, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not handles[0].heartbeat_running
        assert_consistent(dynamodb, busy_table, 0)
        # asyncio.timeout cancels the same way, and must still see its TimeoutError.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await work(asyncio.Event())
        assert_consistent(dynamodb, busy_table, 0)

    asyncio.run(main())


def test_cancelled_during_begin_the_lease_is_still_released(dynamodb: Any, busy_table: str) -> None:
    entered = threading.Event()

    def slow_begin(params: dict[str, Any], **_: Any) -> None:
        if is_begin(update_params(params)):
            entered.set()
            time.sleep(0.2)

    dynamodb.meta.events.register("before-call.dynamodb.UpdateItem", slow_begin)

    async def main() -> None:
        task = asyncio.create_task(begin_destructive_op(INSTANCE, "k", table=busy_table, client=dynamodb))
        await asyncio.to_thread(entered.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_until(lambda: state_of(dynamodb, busy_table).counter == 0)
    assert_consistent(dynamodb, busy_table, 0)


def test_heartbeat_stops_once_when_an_operator_removed_the_lease(
    dynamodb: Any, busy_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = record_calls(dynamodb)
    with instance_busy_sync(
        INSTANCE, "k", table=busy_table, client=dynamodb, heartbeat_interval=0.02
    ) as lease:
        assert lease is not None
        dynamodb.update_item(
            TableName=busy_table,
            Key=schema.key(INSTANCE),
            **schema.end_update(lease.lease_id, kind="k", now=0),
        )
        # Renewals may have landed before the removal (on a real engine a request takes long enough
        # for some 20 ms intervals to pass); after it, one renewal fails and the heartbeat stops.
        renewals_before = sum("#hb" in call for call in calls)
        assert lease._thread is not None
        lease._thread.join(timeout=2)
        assert not lease.heartbeat_running
        time.sleep(0.1)
    assert sum("#hb" in call for call in calls) - renewals_before in (0, 1)
    gone = [message for message in warnings_in(caplog) if "no longer on" in message]
    assert len(gone) == 1
    assert_consistent(dynamodb, busy_table, 0)


def test_heartbeat_keeps_trying_through_throttling(
    dynamodb: Any, busy_table: str, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    failed = inject(dynamodb, "ThrottlingException", "Rate exceeded", when=is_heartbeat, times=3)
    with instance_busy_sync(
        INSTANCE, "k", table=busy_table, client=dynamodb, clock=clock, heartbeat_interval=0.02, lease_ttl=1.0
    ) as lease:
        assert lease is not None
        clock.advance(60)
        wait_until(
            lambda: (
                getattr(lease_on_item(dynamodb, busy_table, lease.lease_id), "heartbeat_at", 0) == clock.now
            )
        )
    assert len(failed) == 3
    assert sum("ThrottlingException" in message for message in warnings_in(caplog)) == 3


# --- failures are swallowed, bounded, and never hide the body's exception --------------------------
@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("AccessDeniedException", "User: arn:aws:sts::123456789012:assumed-role/app is not authorized"),
        ("ThrottlingException", "Rate exceeded"),
        (
            "ProvisionedThroughputExceededException",
            "The level of configured provisioned throughput was exceeded",
        ),
        ("InternalServerError", "Internal server error"),
    ],
)
def test_begin_failures_are_logged_and_the_body_runs(
    dynamodb: Any, busy_table: str, caplog: pytest.LogCaptureFixture, code: str, message: str
) -> None:
    inject(dynamodb, code, message, when=is_begin)
    ran = False
    with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb) as lease:
        ran = True
        assert lease is None
    assert ran
    logged = warnings_in(caplog)
    assert code in logged[0] and "runs without a lease" in logged[0]
    if code == "AccessDeniedException":  # and once per process, what the writers' policy allows
        assert len(logged) == 2 and "attach the stack's WriterPolicyArn" in logged[1], logged
    else:
        assert len(logged) == 1, logged
    assert item_of(dynamodb, busy_table) is None


def test_a_missing_table_is_logged_and_the_body_runs(dynamodb: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> Any:
        async with instance_busy(INSTANCE, "k", table="no-such-table", client=dynamodb) as lease:
            return lease

    assert asyncio.run(main()) is None
    assert any("ResourceNotFoundException" in message for message in warnings_in(caplog))


def test_body_exception_wins_over_a_failing_end(
    dynamodb: Any, busy_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    inject(dynamodb, "AccessDeniedException", "not authorized", when=is_end, times=2)
    boom = RuntimeError("the body failed")
    with pytest.raises(RuntimeError) as raised:  # noqa: SIM117
        with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb):
            raise boom
    assert raised.value is boom

    async def main() -> None:
        async with instance_busy(INSTANCE, "k", table=busy_table, client=dynamodb):
            raise boom

    with pytest.raises(RuntimeError) as raised_async:
        asyncio.run(main())
    assert raised_async.value is boom
    assert sum("expires on its own" in message for message in warnings_in(caplog)) == 2
    assert_consistent(dynamodb, busy_table, 2)  # both leases stay until they expire


def test_body_exception_propagates_when_begin_failed(dynamodb: Any) -> None:
    boom = ValueError("body")
    with pytest.raises(ValueError) as raised:  # noqa: SIM117
        with instance_busy_sync(INSTANCE, "k", table="no-such-table", client=dynamodb):
            raise boom
    assert raised.value is boom


def test_unreachable_endpoint_costs_little(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    started = time.monotonic()
    with instance_busy_sync(INSTANCE, "k", table="t", endpoint_url=endpoint) as lease:
        assert lease is None
        elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert any("runs without a lease" in message for message in warnings_in(caplog))


@pytest.fixture
def hanging_endpoint() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog does) and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def count_http_attempts(client: Any) -> list[str]:
    attempts: list[str] = []
    client.meta.events.register("before-send.dynamodb.*", lambda request, **_: attempts.append(request.url))
    return attempts


def test_a_hanging_endpoint_holds_begin_about_a_second(
    hanging_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUSY_GUARD_ENDPOINT_URL", hanging_endpoint)
    attempts = count_http_attempts(writer._shared_client(hanging_endpoint))  # built before the clock starts
    ran = False
    started = time.monotonic()
    with instance_busy_sync(INSTANCE, "k", table="t") as lease:
        elapsed = time.monotonic() - started
        ran = True
        assert lease is None
    assert ran
    assert len(attempts) == 2  # bounded retries: one retry, then give up
    assert 0.9 < elapsed < 2.5, elapsed  # two 0.5 s read timeouts
    print(f"begin against a hanging endpoint took {elapsed:.2f} s")


def test_a_hanging_endpoint_does_not_block_the_event_loop(hanging_endpoint: str) -> None:
    writer._shared_client(hanging_endpoint)  # built before the clock starts

    async def main() -> tuple[float, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        async with instance_busy(INSTANCE, "k", table="t", endpoint_url=hanging_endpoint) as lease:
            elapsed = time.monotonic() - started
            assert lease is None
        ticking.cancel()
        return elapsed, ticks

    elapsed, ticks = asyncio.run(main())
    assert elapsed < 2.5
    assert ticks >= 10  # the loop kept running while begin waited


def test_an_empty_instance_id_is_a_logged_no_op(
    dynamodb: Any, busy_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = record_calls(dynamodb)
    for _ in range(2):
        with instance_busy_sync("", "k", table=busy_table, client=dynamodb) as lease:
            assert lease is None
    assert asyncio.run(begin_destructive_op("  ", "k", table=busy_table, client=dynamodb)) is None
    assert calls == []
    assert len(warnings_in(caplog)) == 1  # once per process; later ones at debug


def test_no_table_name_is_an_error_once_and_the_body_runs(
    dynamodb: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ran = 0
    for _ in range(3):
        with instance_busy_sync(INSTANCE, "k", client=dynamodb) as lease:
            assert lease is None
            ran += 1
    assert ran == 3
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "BUSY_GUARD_TABLE" in errors[0].getMessage()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"on_draining": "ignore"}, "on_draining"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"heartbeat_interval": -1.0}, "heartbeat_interval"),
        ({"heartbeat_interval": float("nan")}, "heartbeat_interval"),
        ({"lease_ttl": 60.0}, "lease_ttl"),
        ({"heartbeat_interval": 10.0, "lease_ttl": 5.0}, "lease_ttl"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        begin_destructive_op_sync(INSTANCE, "k", table="t", **kwargs)
    with pytest.raises(ValueError, match=named):
        asyncio.run(begin_destructive_op(INSTANCE, "k", table="t", **kwargs))


def test_lease_handle_repr_shows_the_lease_not_the_machinery(dynamodb: Any, busy_table: str) -> None:
    lease = begin_destructive_op_sync(INSTANCE, "k", table=busy_table, client=dynamodb)
    assert lease is not None
    text = repr(lease)
    assert lease.lease_id in text and INSTANCE in text and "_writer" not in text
    end_destructive_op_sync(INSTANCE, lease)


def test_end_with_something_that_is_not_a_handle_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    end_destructive_op_sync(INSTANCE, "bulk_table_insert")  # type: ignore[arg-type]
    asyncio.run(end_destructive_op(INSTANCE, "bulk_table_insert"))  # type: ignore[arg-type]
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 2 and "needs the handle" in errors[0].getMessage()


def test_an_async_lease_may_be_ended_by_the_sync_api(dynamodb: Any, busy_table: str) -> None:
    async def main() -> None:
        lease = await begin_destructive_op(
            INSTANCE, "k", table=busy_table, client=dynamodb, heartbeat_interval=0.02
        )
        assert lease is not None and lease.heartbeat_running
        end_destructive_op_sync(INSTANCE, lease)
        await asyncio.sleep(0.05)
        assert not lease.heartbeat_running

    asyncio.run(main())
    assert_consistent(dynamodb, busy_table, 0)


# --- defects DynamoDB Local found ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "leases_before", "counter_after_begin"),
    [("0", 0, 1), ("2", 0, 3), ("busy", 0, 1), ("0", 1, 2)],
    ids=["zero", "two-legacy-ops", "not-a-number", "zero-with-a-lease"],
)
def test_a_string_counter_is_repaired_and_the_lease_taken(
    dynamodb: Any,
    busy_table: str,
    caplog: pytest.LogCaptureFixture,
    raw: str,
    leases_before: int,
    counter_after_begin: int,
) -> None:
    """DynamoDB refuses ``ADD`` on a string counter (ValidationException: "An operand in the update
    expression has an incorrect data type"), so every begin failed and the work ran without a lease;
    moto applied half of it (the lease, not the count). The writer now turns the string back into a
    number (conditioned on its type and value) and takes its lease, on both engines.

    Which engine is right: DynamoDB Local. A ValidationException is a rejected request ("The input
    fails to satisfy the constraints", https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/CommonErrors.html)
    and Amazon's engine writes nothing for it; moto's partial write is a moto defect, which the
    repair absorbs (a half-applied begin's own lease is counted once)."""
    old_lease = schema.Lease("old", "k", "h", 1.0, 1.0, 4_000_000_000.0)
    item: dict[str, Any] = {"instance_id": {"S": INSTANCE}, "active_destructive_ops": {"S": raw}}
    if leases_before:
        item["leases"] = {"M": {old_lease.lease_id: schema.lease_value(old_lease)}}
    dynamodb.put_item(TableName=busy_table, Item=item)
    with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb) as lease:
        assert lease is not None, "the work must run with a lease"
        stored = item_of(dynamodb, busy_table)
        assert stored is not None and stored["active_destructive_ops"] == {"N": str(counter_after_begin)}
        assert lease.lease_id in {entry.lease_id for entry in state_of(dynamodb, busy_table).leases}
    assert state_of(dynamodb, busy_table).counter == counter_after_begin - 1
    assert state_of(dynamodb, busy_table).problems == ()
    [repaired] = [m for m in warnings_in(caplog) if "repaired" in m]
    assert f"the string '{raw}'" in repaired
    # Later begins need no repair any more.
    calls = record_calls(dynamodb)
    with instance_busy_sync(INSTANCE, "k", table=busy_table, client=dynamodb) as again:
        assert again is not None
    assert len(calls) == 2


def test_a_string_counter_changed_under_the_repair_is_left_alone(dynamodb: Any, busy_table: str) -> None:
    """The repair is conditioned on the string the writer saw: a concurrent change wins."""
    dynamodb.put_item(
        TableName=busy_table, Item={"instance_id": {"S": INSTANCE}, "active_destructive_ops": {"S": "1"}}
    )
    request = schema.repair_counter_update("7", 7)
    with pytest.raises(dynamodb.exceptions.ConditionalCheckFailedException):
        dynamodb.update_item(TableName=busy_table, Key=schema.key(INSTANCE), **request)
    assert item_of(dynamodb, busy_table)["active_destructive_ops"] == {"S": "1"}  # type: ignore[index]


def test_a_long_kind_is_cut_so_two_such_leases_fit_in_one_item(
    dynamodb: Any, busy_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A kind is stored twice (lease and last kind) and an item may hold 400 KB: unbounded, a
    second lease with a 140 kB kind failed (its work ran unguarded) and the warning carried the
    whole kind. Kinds are cut to ``settings.MAX_KIND_LENGTH`` and log lines stay short."""
    huge = "x" * 140_000
    first = begin_destructive_op_sync(INSTANCE, huge, table=busy_table, client=dynamodb)
    second = begin_destructive_op_sync(INSTANCE, huge + "y", table=busy_table, client=dynamodb)
    assert first is not None and second is not None
    assert_consistent(dynamodb, busy_table, 2)
    assert {len(lease.kind) for lease in state_of(dynamodb, busy_table).leases} == {settings.MAX_KIND_LENGTH}
    logged = warnings_in(caplog)
    assert len(logged) == 2 and all(len(line) < 300 for line in logged), [len(line) for line in logged]
    end_destructive_op_sync(INSTANCE, first)
    end_destructive_op_sync(INSTANCE, second)
    assert_consistent(dynamodb, busy_table, 0)


def test_log_lines_stay_short_whatever_the_caller_passes(
    dynamodb: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with instance_busy_sync(INSTANCE, "k" * 10_000, table="no-such-table-here", client=dynamodb) as lease:
        assert lease is None  # the table does not exist: logged, the body runs
    logged = warnings_in(caplog)
    assert len(logged) == 2  # the kind was cut; the begin failed
    assert all(len(line) < 600 for line in logged), [len(line) for line in logged]


def test_draining_mark_half_way_through_concurrent_work(
    engine: Engine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 threads of 50 operations and 50 concurrent async operations, all through one client with the
    writer's configuration (no lock on DynamoDB Local: its real concurrency), while the guard's look marks
    the instance draining half-way through. Afterwards the counter equals the lease count and both
    are 0, no begin that started after the mark was accepted, and the client's connection pool
    was large enough (urllib3 warns when it has to discard connections)."""
    from botocore.config import Config
    from conftest import aws_session

    from busy_guard.guard.table import BusyTable

    monkeypatch.setenv("BUSY_GUARD_TABLE", engine.table)
    caplog.set_level(logging.WARNING, "urllib3.connectionpool")
    table = BusyTable(engine.client, engine.table)
    # The writer's own client configuration (its pool size), with timeouts a loaded machine can't
    # hit: a timed-out end would leave its lease to expire, which is by design but not this test.
    shared = aws_session().client(
        "dynamodb",
        endpoint_url=engine.endpoint_url,
        config=writer.CLIENT_CONFIG.merge(Config(connect_timeout=30, read_timeout=30)),
    )
    assert shared.meta.config.max_pool_connections == settings.WRITER_MAX_POOL_CONNECTIONS
    lock = threading.Lock()
    begun = 0
    marked_at: list[float] = []  # monotonic time the mark's call returned
    accepted_after_mark: list[float] = []
    refused = 0
    errors: list[BaseException] = []

    def note(started: float, lease: Any) -> None:
        nonlocal begun
        with lock:
            begun += 1
            if lease is not None and marked_at and started > marked_at[0]:
                accepted_after_mark.append(started)

    def one_sync() -> None:
        nonlocal refused
        started = time.monotonic()
        try:
            with instance_busy_sync(INSTANCE, "threaded", client=shared) as lease:
                note(started, lease)
        except InstanceDrainingError:
            with lock:
                refused += 1

    def worker() -> None:
        try:
            for _ in range(50):
                one_sync()
        except BaseException as err:
            errors.append(err)

    async def one_async(number: int) -> None:
        nonlocal refused
        await asyncio.sleep(random.uniform(0, 0.2))
        started = time.monotonic()
        try:
            async with instance_busy(INSTANCE, f"async-{number % 3}", client=shared) as lease:
                note(started, lease)
                await asyncio.sleep(random.uniform(0, 0.02))
        except InstanceDrainingError:
            with lock:
                refused += 1

    def guard() -> None:
        deadline = time.monotonic() + 60
        while begun < 200 and time.monotonic() < deadline:
            time.sleep(0.005)
        state = table.mark_draining(INSTANCE, schema.Draining(since=time.time(), asg="g", hook="h"))
        marked_at.append(time.monotonic())
        assert state.draining is not None

    threads = [threading.Thread(target=worker) for _ in range(8)] + [threading.Thread(target=guard)]
    for thread in threads:
        thread.start()

    async def main() -> None:
        await asyncio.gather(*(one_async(number) for number in range(50)))

    asyncio.run(main())
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a worker never finished"
    assert not errors
    assert marked_at, "the guard never looked"
    assert accepted_after_mark == [], "a begin that started after the mark was accepted"
    assert refused > 0 and begun >= 200
    assert_consistent(engine.client, engine.table, 0)
    pool_full = [r.getMessage() for r in caplog.records if "Connection pool is full" in r.getMessage()]
    assert pool_full == []
