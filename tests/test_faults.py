"""Fault injection on every AWS call of the guard and of the writer, and crashes mid-invocation.

Faults are injected behind the real boto3 clients, so botocore's parser and its retry handler see
exactly what they see from AWS:

- DynamoDB: a ``before-send.dynamodb.<Op>`` handler answers the matching request with the HTTP
  error AWS sends (JSON body, ``__type`` code), raises the exception urllib3 raises for a timeout or
  an unreachable endpoint, or lets the engine execute the request and then loses the response (a
  read timeout after the write landed: the retry sees its own earlier write). The request really
  goes through on either engine (:func:`send_for_real`: moto's in-process stubber where moto serves
  the URL, else a real HTTP send to DynamoDB Local), so every case runs on both.
- Auto Scaling: the lifecycle-hook emulator's ``fail_next`` (AWS-shaped XML errors), or a raising
  ``before-send`` for timeouts.

The guard's matrix runs one scenario per (call, fault kind) with three instances: ``busy`` (a live
lease throughout), ``done`` (its lease ends during the fault) and ``lost`` (its lifecycle event never
arrives). During the fault nothing is completed early, ``busy`` keeps being heartbeated, and the
first tick after the fault clears converges: ``done`` and ``lost`` completed exactly once, ``busy``
still waiting with a fresh heartbeat. A final test prints how many faults were injected and
survived.

One sandbox per engine (moto + emulator, with the table on moto or on DynamoDB Local) serves the
whole module: every case takes fresh instances and a fresh
guard with fresh clients (a fresh botocore retry quota), so cases stay independent and the module
stays fast. Sleeps of botocore's retries (the only retry layer) are skipped for the
guard (counted instead); the writer keeps its real sleeps, because its time budget is under test.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import botocore.endpoint
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from botocore.httpsession import URLLib3Session
from conftest import ENGINES, MOTO
from moto.core.models import botocore_stubber

from busy_guard import schema, writer
from busy_guard.guard import handler as guard_handler
from busy_guard.guard.autoscaling import AutoScalingUnavailableError, LifecycleHooks
from busy_guard.guard.handler import ReconcileError
from busy_guard.guard.reconcile import Guard
from busy_guard.guard.table import BusyTable, TableUnavailableError
from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.world import HOOK, Sandbox, SandboxSettings, matches
from busy_guard.settings import MIN_HEARTBEAT_TIMEOUT_SECONDS, heartbeat_every_seconds

START = 1_800_000_000.0
GROUP = "graph-db"
TICK = 60.0
LEASE_TTL = 3600
DIVERTED = "https://busy-guard-fault-injection.invalid/"


# --- the ledger the summary prints ------------------------------------------------------------------
class Injector(Protocol):
    @property
    def injected(self) -> int: ...


@dataclass
class Case:
    """One fault case: what it injected, and whether everything held."""

    area: str = ""
    faults: Injector | None = None
    ok: bool = False


@dataclass
class Ledger:
    injected: int = 0
    survived: int = 0
    cases: int = 0
    by_area: dict[str, tuple[int, int]] = field(default_factory=dict)

    def close(self, case: Case) -> None:
        injected = case.faults.injected if case.faults is not None else 0
        survived = injected if case.ok else 0
        self.injected += injected
        self.survived += survived
        self.cases += 1
        before = self.by_area.get(case.area, (0, 0))
        self.by_area[case.area] = (before[0] + injected, before[1] + survived)


LEDGER = Ledger()
SKIPPED_SLEEPS: list[float] = []  # botocore's retry backoffs, recorded instead of slept


# --- DynamoDB faults --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DynamoFault:
    status: int = 0
    code: str = ""
    message: str = ""
    raises: type[Exception] | None = None
    once: bool = False  # a transient fault: one HTTP attempt, then gone
    lose_response: bool = False  # moto executes the request; its response never arrives
    persistent: bool = True

    def response(self, operation: str) -> AWSResponse:
        body = json.dumps(
            {
                "__type": f"com.amazonaws.dynamodb.v20120810#{self.code}",
                "message": self.message.format(operation=operation),
            }
        ).encode()
        headers = {
            "Content-Type": "application/x-amz-json-1.0",
            "Content-Length": str(len(body)),
            "x-amzn-RequestId": uuid.uuid4().hex.upper(),
        }
        return AWSResponse(DIVERTED, self.status, headers, _Raw(body))


class _Raw:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


DYNAMO_KINDS: dict[str, DynamoFault] = {
    "throttling": DynamoFault(400, "ThrottlingException", "Rate of requests exceeds the allowed throughput."),
    "internal_server_error": DynamoFault(500, "InternalServerError", "Internal server error"),
    "read_timeout": DynamoFault(raises=ReadTimeoutError),
    "connect_timeout": DynamoFault(raises=ConnectTimeoutError),
    "endpoint_unreachable": DynamoFault(raises=EndpointConnectionError),
    "access_denied": DynamoFault(
        400,
        "AccessDeniedException",
        "User: arn:aws:sts::123456789012:assumed-role/busy-guard/guard is not authorized to perform: "
        "dynamodb:{operation} on resource: arn:aws:dynamodb:us-east-1:123456789012:table/busy_guard",
    ),
    "lost_response": DynamoFault(lose_response=True, once=True, persistent=False),
    "transient_throttle": DynamoFault(
        400,
        "ThrottlingException",
        "Rate of requests exceeds the allowed throughput.",
        once=True,
        persistent=False,
    ),
}

_RELEASE_IF_IDLE = schema.release_if_idle_update(schema.Released(0, "", ""), ttl=0, not_before=0)
_RELEASE = schema.release_update(schema.Released(0, "", ""), ttl=0, draining_since=1)
_MARK = schema.mark_draining_update(schema.Draining(0, "", ""))
_BEGIN = {
    schema.begin_update(schema.Lease("x", "k", "h", 0, 0, 0), boot_time=0, create_map=create)[
        "UpdateExpression"
    ]
    for create in (True, False)
}
_END = schema.end_update("x", kind="k", now=0)["UpdateExpression"]
_HEARTBEAT = schema.heartbeat_update("x", now=0, expires_at=0)["UpdateExpression"]

Match = Callable[[dict[str, Any]], bool]
_HTTP = URLLib3Session(timeout=10)


def send_for_real(request: Any, event_name: str) -> AWSResponse:
    """Execute a request on its engine from inside a ``before-send`` handler: moto's in-process
    stubber where moto serves the URL, else a real HTTP send (DynamoDB Local). The request's URL is
    then diverted, so that moto's own handler, which runs after this one, can't execute it twice."""
    response: AWSResponse | None = botocore_stubber(event_name=event_name, request=request)
    if response is None:
        response = _HTTP.send(request)
    request.url = DIVERTED
    return response


def _anything(_: dict[str, Any]) -> bool:
    return True


# Which request is which: the operation, and the expression the schema module builds for it.
DYNAMO_POINTS: dict[str, tuple[str, Match]] = {
    # the guard
    "release_if_idle": (
        "UpdateItem",
        lambda b: b.get("ConditionExpression") == _RELEASE_IF_IDLE["ConditionExpression"],
    ),
    "mark_draining": ("UpdateItem", lambda b: b.get("UpdateExpression") == _MARK["UpdateExpression"]),
    "release": (
        "UpdateItem",
        lambda b: (
            b.get("UpdateExpression") == _RELEASE["UpdateExpression"]
            and b.get("ConditionExpression") != _RELEASE_IF_IDLE["ConditionExpression"]
        ),
    ),
    "scan": ("Scan", _anything),
    "batch_get": ("BatchGetItem", _anything),
    "get": ("GetItem", _anything),
    # the writer
    "begin": ("UpdateItem", lambda b: b.get("UpdateExpression") in _BEGIN),
    "writer_heartbeat": ("UpdateItem", lambda b: b.get("UpdateExpression") == _HEARTBEAT),
    "end": ("UpdateItem", lambda b: b.get("UpdateExpression") == _END),
}


class DynamoFaults:
    """Fail the requests of one call site on one client until :meth:`clear`."""

    def __init__(self, client: Any, point: str, kind: str, *, delay: float = 0.0) -> None:
        self.operation, self._match = DYNAMO_POINTS[point]
        self.fault = DYNAMO_KINDS[kind]
        self.injected = 0
        self._delay = delay  # how long a timeout holds the caller (the client's own timeout)
        self._active = True
        self._lock = threading.Lock()
        client.meta.events.register_first(f"before-send.dynamodb.{self.operation}", self._before_send)

    def clear(self) -> None:
        with self._lock:
            self._active = False

    def _claim(self, body: dict[str, Any]) -> bool:
        with self._lock:
            if not self._active or not self._match(body):
                return False
            if self.fault.once and not self.fault.lose_response:
                self._active = False
            self.injected += 1
        return True

    def _before_send(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        body = json.loads(request.body or b"{}")
        fault = self.fault
        if fault.lose_response:
            with self._lock:
                armed = self._active and self._match(body)
            if not armed:
                return None
            response = send_for_real(request, event_name)
            if response.status_code != 200:
                return response  # lose a response that reports a change, not a refusal
            with self._lock:
                if not self._active:
                    return response
                self._active = False
                self.injected += 1
            raise ReadTimeoutError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com/")
        if not self._claim(body):
            return None
        if fault.raises is not None:
            if self._delay:
                time.sleep(self._delay)
            raise fault.raises(endpoint_url=request.url)
        request.url = DIVERTED
        return fault.response(self.operation)


# --- Auto Scaling faults ----------------------------------------------------------------------------
AS_KINDS: dict[str, str] = {
    "throttling": "Throttling",
    "resource_contention": "ResourceContention",
    "service_unavailable": "ServiceUnavailable",  # 503
    "internal_failure": "InternalFailure",  # 500
    "access_denied": "AccessDenied",  # 403
    "read_timeout": "",  # raised at before-send
    "transient_throttle": "Throttling",  # one attempt only
}
AS_POINTS = {
    "describe": "DescribeAutoScalingGroups",
    "complete": "CompleteLifecycleAction",
    "heartbeat": "RecordLifecycleActionHeartbeat",
}


class AutoScalingFaults:
    def __init__(self, sb: Sandbox, client: Any, point: str, kind: str) -> None:
        self.sb = sb
        self.operation = AS_POINTS[point]
        self.persistent = kind != "transient_throttle"
        self._raised = 0
        self._active = True
        self._lock = threading.Lock()
        self._faulted_before = sb.emulator.calls(self.operation).faulted
        if kind == "read_timeout":
            client.meta.events.register_first(f"before-send.auto-scaling.{self.operation}", self._timeout)
        else:
            sb.emulator.fail_next(self.operation, AS_KINDS[kind], count=10_000 if self.persistent else 1)

    @property
    def injected(self) -> int:
        return self._raised + self.sb.emulator.calls(self.operation).faulted - self._faulted_before

    def clear(self) -> None:
        with self._lock:
            self._active = False
        self.sb.emulator.clear_faults()

    def _timeout(self, request: Any, **_: Any) -> None:
        with self._lock:
            if not self._active:
                return
            self._raised += 1
        raise ReadTimeoutError(endpoint_url=request.url)


# --- the world: one sandbox for the module ----------------------------------------------------------
@dataclass
class World:
    sb: Sandbox
    clock: ManualClock
    injectors: list[DynamoFaults | AutoScalingFaults] = field(default_factory=list)
    used: set[str] = field(default_factory=set)  # instance ids whose items settle() deletes

    def fresh_guard(self) -> Guard:
        """A guard with new clients (new retry quota, no leftover handlers), installed in the handler."""
        sb = self.sb
        table = BusyTable(sb.session.client("dynamodb", config=guard_handler._AWS_CONFIG), sb.table_name)
        autoscaling = sb.emulator.attach(sb.session.client("autoscaling", config=guard_handler._AWS_CONFIG))
        hooks = LifecycleHooks(autoscaling, HOOK)
        guard = Guard(table=table, hooks=hooks, config=sb.guard_config, clock=self.clock)
        guard_handler.use_guard(guard)
        sb.guard = guard
        return guard

    def fresh_instances(self, count: int) -> list[str]:
        """``count`` new InService instances in the guarded group."""
        asg = self.sb.autoscaling
        group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
        before = {instance["InstanceId"] for instance in group["Instances"]}
        desired = group["DesiredCapacity"] + count
        asg.update_auto_scaling_group(
            AutoScalingGroupName=GROUP, MaxSize=max(group["MaxSize"], desired), DesiredCapacity=desired
        )
        fresh = sorted(set(self.sb.instances(GROUP)) - before)
        assert len(fresh) == count, fresh
        self.used.update(fresh)
        return fresh

    def writer_instance(self) -> str:
        instance = f"i-{uuid.uuid4().hex[:17]}"
        self.used.add(instance)
        return instance

    def tick(self, seconds: float = TICK) -> BaseException | None:
        """Advance the clock, run one schedule tick; the ReconcileError a failing tick raises (so the
        Lambda Errors alarm fires) is returned, not raised."""
        self.clock.advance(seconds)
        try:
            self.sb.tick()
        except ReconcileError as error:
            return error
        return None

    def settle(self) -> None:
        """Leave nothing for the next case, whatever this one did: no fault, no pending action, and
        an empty table (moto's Scan slows down as the table grows)."""
        self.sb.emulator.clear_faults()
        for injector in self.injectors:
            injector.clear()
        self.injectors.clear()
        if self.sb.emulator.actions():
            self.clock.advance(1000)  # past every HeartbeatTimeout: the hooks' DefaultResult ends them
            self.sb.emulator.apply_timeouts()
        while self.used:
            self.sb.dynamodb.delete_item(TableName=self.sb.table_name, Key=schema.key(self.used.pop()))


@pytest.fixture(scope="module", params=ENGINES)
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    """One sandbox per engine for the module: the table on moto, or on DynamoDB Local."""
    clock = ManualClock(START)
    # A HeartbeatTimeout just over three ticks: a heartbeat is due on every tick (after
    # settings.heartbeat_every_seconds), so each tick during a fault shows whether the busy instance
    # is still held, and a lost event survives the two failed ticks of a fault.
    timeout = MIN_HEARTBEAT_TIMEOUT_SECONDS + 30
    assert heartbeat_every_seconds(timeout, TICK) < TICK - 1
    settings = SandboxSettings(heartbeat_timeout=timeout, max_wait=3 * 3600)
    local = None if request.param == MOTO else request.getfixturevalue("dynamodb_local")
    with Sandbox.start(settings, clock=clock, dynamodb_local=local) as sb:
        yield World(sb, clock)


def _fresh_guard_without_retry_sleeps(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(botocore.endpoint, "time", types.SimpleNamespace(sleep=SKIPPED_SLEEPS.append))
    world.fresh_guard()


@pytest.fixture
def guard_world(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """The world with a fresh guard; botocore's retry sleeps are recorded, not slept."""
    _fresh_guard_without_retry_sleeps(world, monkeypatch)
    try:
        yield world
    finally:
        world.settle()


@pytest.fixture
def quick_world(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """A fresh guard for calls that change nothing (every attempt fails): no settling needed."""
    _fresh_guard_without_retry_sleeps(world, monkeypatch)
    try:
        yield world
    finally:
        world.sb.emulator.clear_faults()


@pytest.fixture
def case() -> Iterator[Case]:
    """The ledger entry of one fault case; the test sets ``ok`` once everything held."""
    record = Case()
    yield record
    LEDGER.close(record)


def begin(sb: Sandbox, instance_id: str, kind: str = "bulk_table_insert") -> Any:
    """A real writer lease on the sandbox's (fault-free) client; the test drives its heartbeats."""
    return sb.begin(instance_id, kind, lease_ttl=LEASE_TTL)


end = Sandbox.end


def completions(sb: Sandbox, instance_id: str) -> list[tuple[str, str]]:
    return [(c.result, c.by) for c in sb.emulator.completions(instance_id)]


# --- the guard's matrix -----------------------------------------------------------------------------
# Persistent faults on these calls fail the tick as a whole (ReconcileError), so the alarm fires.
TICK_FAILS = {"scan", "describe", "heartbeat", "complete"}
# Kinds that take one path through botocore and the guard (three connection failures, two 5xx codes of
# Auto Scaling) run once here; the adapter tests below run every kind on every call.
GUARD_DYNAMO_KINDS = [k for k in DYNAMO_KINDS if k not in ("connect_timeout", "endpoint_unreachable")]
GUARD_AS_KINDS = [k for k in AS_KINDS if k != "internal_failure"]
GUARD_MATRIX = [
    *[
        ("dynamodb", point, kind)
        for point in ("release_if_idle", "mark_draining", "release", "scan", "batch_get")
        for kind in GUARD_DYNAMO_KINDS
    ],
    *[("autoscaling", point, kind) for point in AS_POINTS for kind in GUARD_AS_KINDS],
]


@pytest.mark.parametrize(
    ("service", "point", "kind"), GUARD_MATRIX, ids=[f"{p}-{k}" for _, p, k in GUARD_MATRIX]
)
def test_guard_survives_the_fault_and_converges(
    guard_world: World, case: Case, service: str, point: str, kind: str
) -> None:
    w = guard_world
    sb, clock = w.sb, w.clock
    busy, done, lost = w.fresh_instances(3)
    begin(sb, busy)
    done_lease = begin(sb, done)
    accepted = sb.emulator.calls("CompleteLifecycleAction").accepted
    guard = sb.guard
    faults: DynamoFaults | AutoScalingFaults
    if service == "dynamodb":
        faults = DynamoFaults(guard.table.client, point, kind)
        persistent = DYNAMO_KINDS[kind].persistent
    else:
        faults = AutoScalingFaults(sb, guard.hooks.client, point, kind)
        persistent = faults.persistent
    w.injectors.append(faults)
    case.area, case.faults = f"guard/{service}", faults
    heartbeats_stopped = point == "heartbeat" and persistent

    # --- during the fault ---------------------------------------------------------------------------
    sb.terminate(busy)  # events never raise: a failed look is a held instance
    sb.terminate(done)
    sb.terminate(lost, deliver=False)  # its event is lost: only the schedule can find it
    assert completions(sb, busy) == completions(sb, done) == []

    beats = sb.emulator.heartbeats(busy)
    failed = [w.tick()]
    assert completions(sb, busy) == [] and completions(sb, done) == []  # both hold live leases
    if not heartbeats_stopped:
        assert sb.emulator.heartbeats(busy) > beats, "the tick must keep holding the busy instance"

    end(done_lease)  # the last lease ends: the stream wakes the guard
    clock.advance(1)
    streamed = sb.pump_stream()
    if streamed is not None and streamed["batchItemFailures"]:
        assert persistent and point == "complete", streamed
    beats = sb.emulator.heartbeats(busy)
    failed.append(w.tick(TICK - 1))
    if not heartbeats_stopped:
        assert sb.emulator.heartbeats(busy) > beats
    assert completions(sb, busy) == [], "never CONTINUE for live work, whatever failed"
    assert faults.injected > 0, "the fault never fired: the case tests nothing"
    if persistent and point in TICK_FAILS:  # a tick that could not do its job fails loudly, saying why
        assert all(f" {faults.operation} failed: " in str(error) for error in failed), failed
    else:
        assert failed == [None, None], failed
    for instance in (done, lost):  # completed during the fault only if provably idle, and only once
        assert completions(sb, instance) in ([], [("CONTINUE", "guard")])

    # --- the fault clears: the next tick converges -------------------------------------------------
    faults.clear()
    beats = sb.emulator.heartbeats(busy)
    assert w.tick() is None
    assert sb.emulator.calls("CompleteLifecycleAction").accepted - accepted == 2  # done and lost, once
    assert completions(sb, done) == [("CONTINUE", "guard")]
    assert completions(sb, lost) == [("CONTINUE", "guard")]
    assert completions(sb, busy) == []
    assert sb.emulator.state(busy) == "Terminating:Wait"
    assert sb.emulator.heartbeats(busy) > beats
    assert sb.item(busy).draining is not None
    for instance in (done, lost):
        item = sb.item(instance)
        assert item.draining is None and item.released is not None and item.expires_at is not None
    case.ok = True


# --- every adapter call maps every failure to its one error type ---------------------------------------
ADAPTER_CALLS: dict[str, Callable[[Guard, str], Any]] = {
    "release_if_idle": lambda g, i: g.table.release_if_idle(
        i, schema.Released(1, "idle", "t"), ttl=2, not_before=0
    ),
    "mark_draining": lambda g, i: g.table.mark_draining(i, schema.Draining(1, GROUP, HOOK)),
    "release": lambda g, i: g.table.release(i, schema.Released(1, "idle", "t"), ttl=2, draining_since=1),
    "get": lambda g, i: g.table.get(i),
    "scan": lambda g, i: g.table.draining_items(),
    "batch_get": lambda g, i: g.table.get_many([i]),
    "complete": lambda g, i: g.hooks.complete(GROUP, i, "CONTINUE"),
    "heartbeat": lambda g, i: g.hooks.heartbeat(GROUP, i),
    "describe": lambda g, i: g.hooks.waiting_instances([GROUP]),
}
PERSISTENT_DYNAMO = [k for k, f in DYNAMO_KINDS.items() if f.persistent]
PERSISTENT_AS = [k for k in AS_KINDS if k != "transient_throttle"]
ADAPTER_MATRIX = [
    *[
        (call, kind)
        for call in ("release_if_idle", "mark_draining", "release", "get", "scan", "batch_get")
        for kind in PERSISTENT_DYNAMO
    ],
    *[(call, kind) for call in ("complete", "heartbeat", "describe") for kind in PERSISTENT_AS],
]


@pytest.mark.parametrize(("call", "kind"), ADAPTER_MATRIX, ids=[f"{c}-{k}" for c, k in ADAPTER_MATRIX])
def test_adapters_raise_their_own_error_with_a_short_message(
    quick_world: World, case: Case, call: str, kind: str
) -> None:
    """The guard's control flow relies on it: a table failure is ``TableUnavailableError`` (a WAIT),
    an Auto Scaling failure ``AutoScalingUnavailableError``; never a raw botocore exception."""
    w = quick_world
    guard = w.sb.guard
    instance = f"i-{uuid.uuid4().hex[:17]}"
    faults: DynamoFaults | AutoScalingFaults
    if call in AS_POINTS:
        faults = AutoScalingFaults(w.sb, guard.hooks.client, call, kind)
        expected: type[Exception] = AutoScalingUnavailableError
    else:
        faults = DynamoFaults(guard.table.client, call, kind)
        expected = TableUnavailableError
    case.area, case.faults = "adapters", faults
    with pytest.raises(expected) as raised:
        ADAPTER_CALLS[call](guard, instance)
    faults.clear()
    message = str(raised.value)
    assert f" {faults.operation} failed: " in message and len(message) <= 300, message
    attempts = faults.injected
    assert attempts >= (1 if kind == "access_denied" else 2), "retryable faults are retried"
    case.ok = True


# --- the writer ---------------------------------------------------------------------------------------
WRITER_POINTS = {"begin": "begin", "heartbeat": "writer_heartbeat", "end": "end"}
WRITER_MATRIX = [(op, kind) for op in WRITER_POINTS for kind in DYNAMO_KINDS]
BUDGET = 1.5  # seconds any begin or end may cost, whatever DynamoDB does


class BodyError(Exception):
    """The body's own failure: it must come out unchanged."""


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


async def _async_wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Every wait has a deadline: a fault that never fires fails the case, never hangs the run."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def _writer_client(w: World) -> Any:
    # The writer's own client configuration: 0.5 s timeouts, two attempts.
    return w.sb.session.client("dynamodb", config=writer.CLIENT_CONFIG)


def _writer_faults(client: Any, op: str, kind: str) -> DynamoFaults:
    # A read timeout holds the caller for the client's own timeout before it raises, as a silent
    # endpoint would (the connect failures stay instant: test_writer.py times a real dead endpoint).
    delay = float(writer.CLIENT_CONFIG.read_timeout or 0) if kind == "read_timeout" else 0.0
    return DynamoFaults(client, WRITER_POINTS[op], kind, delay=delay)


def _check_writer_item(w: World, instance: str, op: str, kind: str, lease: Any) -> None:
    persistent = DYNAMO_KINDS[kind].persistent
    item = w.sb.item(instance)
    assert item.counter is None or item.counter >= 0, "a lost begin or a retried end never goes negative"
    if op == "begin" and persistent:
        assert lease is None and not item.leases  # the body ran without a lease
    elif op == "end" and persistent:
        # The end could not be recorded: the lease stays, and expires on its own.
        assert [entry.lease_id for entry in item.leases] == [lease.lease_id]
        assert item.leases[0].expires_at <= w.clock() + LEASE_TTL
        assert item.counter == 1
    else:
        assert lease is not None
        assert item.leases == () and item.counter == 0


@pytest.mark.parametrize(("op", "kind"), WRITER_MATRIX, ids=[f"{o}-{k}" for o, k in WRITER_MATRIX])
def test_writer_never_blocks_nor_raises(world: World, case: Case, op: str, kind: str) -> None:
    client = _writer_client(world)
    instance = world.writer_instance()
    faults = _writer_faults(client, op, kind)
    case.area, case.faults = "writer", faults
    ran = False
    started = time.monotonic()
    with (
        pytest.raises(BodyError, match="the body's own"),
        writer.instance_busy_sync(
            instance,
            "bulk_table_insert",
            table=world.sb.table_name,
            client=client,
            clock=world.clock,
            heartbeat_interval=0.05,
            lease_ttl=LEASE_TTL,
        ) as lease,
    ):
        begin_took = time.monotonic() - started
        ran = True
        if op == "heartbeat":
            _wait_for(lambda: faults.injected > 0)
            faults.clear()
            # The heartbeat keeps going through the fault: the next one after it renews the lease.
            now = world.clock.advance(7)
            _wait_for(lambda: any(e.heartbeat_at == now for e in world.sb.item(instance).leases))
        body_done = time.monotonic()
        raise BodyError("the body's own error")
    end_took = time.monotonic() - body_done
    assert ran
    assert begin_took < BUDGET and end_took < BUDGET, (begin_took, end_took)
    assert faults.injected > 0
    if lease is not None:
        _wait_for(lambda: not lease.heartbeat_running, timeout=2)
    faults.clear()
    _check_writer_item(world, instance, op, kind, lease)
    case.ok = True


ASYNC_MATRIX = [
    (op, kind) for op in WRITER_POINTS for kind in ("read_timeout", "access_denied", "lost_response")
]


@pytest.mark.parametrize(("op", "kind"), ASYNC_MATRIX, ids=[f"{o}-{k}" for o, k in ASYNC_MATRIX])
def test_async_writer_never_blocks_the_event_loop(world: World, case: Case, op: str, kind: str) -> None:
    client = _writer_client(world)
    instance = world.writer_instance()
    faults = _writer_faults(client, op, kind)
    case.area, case.faults = "writer", faults
    gaps: list[float] = []
    timings: dict[str, float] = {}
    held: list[Any] = []

    async def ticker(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    async def main() -> None:
        stop = asyncio.Event()
        probe = asyncio.create_task(ticker(stop))
        started = time.monotonic()
        try:
            async with writer.instance_busy(
                instance,
                "bulk_table_insert",
                table=world.sb.table_name,
                client=client,
                clock=world.clock,
                heartbeat_interval=0.05,
                lease_ttl=LEASE_TTL,
            ) as lease:
                held.append(lease)
                timings["begin"] = time.monotonic() - started
                if op == "heartbeat":
                    await _async_wait_for(lambda: faults.injected > 0)
                    faults.clear()
                    now = world.clock.advance(7)
                    await _async_wait_for(
                        lambda: any(e.heartbeat_at == now for e in world.sb.item(instance).leases)
                    )
                timings["body_done"] = time.monotonic()
                raise BodyError("the body's own error")
        finally:
            timings["end"] = time.monotonic() - timings.get("body_done", started)
            stop.set()
            await probe

    with pytest.raises(BodyError):
        asyncio.run(main())
    assert timings["begin"] < BUDGET and timings["end"] < BUDGET, timings
    # A begin or end run on the loop would stall it for a whole read timeout (0.5 s) per attempt.
    assert max(gaps) < 0.4, f"the event loop stalled for {max(gaps):.2f}s"
    assert faults.injected > 0
    faults.clear()
    _check_writer_item(world, instance, op, kind, held[0])
    case.ok = True


# --- crashes mid-invocation ---------------------------------------------------------------------------
class Crash(BaseException):
    """The invocation dies here (timeout, out of memory): nothing after this point runs."""


CRASHES = [
    ("after_heartbeat", "tick"),
    ("after_mark_draining", "event"),
    ("after_release_if_idle", "event"),
    ("after_release", "stream"),
    ("after_release", "tick"),
    ("before_complete", "event"),
    ("before_complete", "stream"),
    ("before_complete", "tick"),
    ("after_complete", "event"),
    ("after_complete", "stream"),
    ("after_complete", "tick"),
]


class CrashOnce:
    """Kill the invocation once at ``point``: after a DynamoDB write landed (before its response is
    read), or before/after an Auto Scaling call."""

    def __init__(self, guard: Guard, point: str) -> None:
        self.fired = 0
        self._lock = threading.Lock()
        when, _, what = point.partition("_")
        if what in AS_POINTS:
            event = f"{'after-call' if when == 'after' else 'before-send'}.auto-scaling.{AS_POINTS[what]}"
            guard.hooks.client.meta.events.register_first(event, self._autoscaling)
        else:
            operation, self._match = DYNAMO_POINTS[what]
            guard.table.client.meta.events.register_first(f"before-send.dynamodb.{operation}", self._dynamodb)

    @property
    def injected(self) -> int:
        return self.fired

    def _fire(self) -> bool:
        with self._lock:
            if self.fired:
                return False
            self.fired += 1
            return True

    def _autoscaling(self, http_response: Any = None, **_: Any) -> None:
        if http_response is not None and http_response.status_code >= 300:
            return  # after-call of a failed call: nothing landed
        if self._fire():
            raise Crash

    def _dynamodb(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        if self.fired or not self._match(json.loads(request.body or b"{}")):
            return None
        response = send_for_real(request, event_name)
        if response.status_code != 200 or not self._fire():
            return response
        raise Crash  # the write landed; the process died before it read the answer


@pytest.mark.parametrize(("point", "trigger"), CRASHES, ids=[f"{p}-{t}" for p, t in CRASHES])
def test_a_crash_is_finished_by_the_next_trigger_exactly_once(
    guard_world: World, case: Case, point: str, trigger: str
) -> None:
    w = guard_world
    sb, clock = w.sb, w.clock
    [instance] = w.fresh_instances(1)
    accepted = sb.emulator.calls("CompleteLifecycleAction").accepted
    # The event path completes an idle instance itself; the stream and the tick act on a busy one.
    busy = trigger != "event" or point == "after_mark_draining"
    lease = begin(sb, instance) if busy else None
    [event] = sb.terminate(instance, deliver=False)
    crash = CrashOnce(sb.guard, point)
    case.area, case.faults = "crashes", crash
    batch: dict[str, Any] = {}

    # --- the invocation that dies ----------------------------------------------------------------------
    if trigger == "event":
        with pytest.raises(Crash):
            sb.invoke(event)
    else:
        sb.invoke(event)  # marks it draining; the hook's timer starts
        if point != "after_heartbeat":
            end(lease)
            lease = None
        clock.advance(TICK)
        if trigger == "stream":
            records = [
                r for r in sb._new_stream_records() if r["dynamodb"]["Keys"]["instance_id"]["S"] == instance
            ]
            batch = {"Records": [r for r in records if matches(schema.stream_filter_pattern(), r)]}
            assert batch["Records"]
            with pytest.raises(Crash):
                sb.invoke(batch, "stream")
        else:
            with pytest.raises(Crash):
                sb.tick()
    assert crash.fired == 1
    if point == "after_heartbeat":
        assert sb.emulator.heartbeats(instance) == 1  # the heartbeat landed before the crash

    # --- the next triggers: Lambda's own retry of the dead invocation, then the schedule ------------
    clock.advance(5)
    if trigger == "event":
        sb.invoke(event)  # EventBridge retries a failed invocation
    elif trigger == "stream":
        sb.invoke(batch, "stream")  # the event source retries the batch
    else:
        sb.tick()
    if point == "after_heartbeat":
        assert sb.emulator.heartbeats(instance) == 2  # the next tick heartbeats it again
    if lease is not None:  # still busy: the guard keeps holding it, then finishes when the work ends
        assert completions(sb, instance) == []
        end(lease)
    for _ in range(4):
        assert w.tick() is None
    assert completions(sb, instance) == [("CONTINUE", "guard")]
    assert sb.emulator.calls("CompleteLifecycleAction").accepted - accepted == 1
    assert sb.emulator.state(instance) == "Terminated"
    item = sb.item(instance)
    assert item.draining is None and item.released is not None
    case.ok = True


# --- a long Auto Scaling outage ---------------------------------------------------------------------------
def test_a_long_complete_outage_is_finished_by_the_first_tick_after_it(
    guard_world: World, case: Case
) -> None:
    """A recorded release whose CompleteLifecycleAction keeps failing is completed again on every
    tick, for as long as the hook can still be waiting (one HeartbeatTimeout): once the fault
    clears, the next tick completes it, exactly once, and confirms it so no tick tries again."""
    w = guard_world
    sb = w.sb
    [instance] = w.fresh_instances(1)
    faults = AutoScalingFaults(sb, sb.guard.hooks.client, "complete", "throttling")
    w.injectors.append(faults)
    case.area, case.faults = "guard/autoscaling", faults
    with pytest.raises(AutoScalingUnavailableError):
        sb.terminate(instance)  # idle: released at once, but the completion fails (Lambda retries)
    # every tick while the hook may still be waiting, short of its HeartbeatTimeout
    failed = [w.tick() for _ in range(int(sb.guard_config.heartbeat_timeout // TICK) - 1)]
    assert len(failed) >= 2
    assert all(error is not None for error in failed)  # every tick tries, and says it failed
    assert completions(sb, instance) == []
    faults.clear()
    assert w.tick() is None
    assert completions(sb, instance) == [("CONTINUE", "guard")]  # exactly once
    assert w.tick() is None and completions(sb, instance) == [("CONTINUE", "guard")]  # confirmed
    case.ok = True


# --- the summary ----------------------------------------------------------------------------------------
def test_summary_of_injected_and_survived_faults(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last (pytest keeps the file's order): what the cases above injected, and survived."""
    if not LEDGER.cases:
        pytest.skip("no fault case ran in this session")
    areas = "; ".join(
        f"{area}: {injected} injected, {survived} survived"
        for area, (injected, survived) in sorted(LEDGER.by_area.items())
    )
    with capsys.disabled():
        print(
            f"\nfaults injected: {LEDGER.injected}, survived: {LEDGER.survived} "
            f"in {LEDGER.cases} cases ({areas}); "
            f"guard retry backoffs skipped: {len(SKIPPED_SLEEPS)} ({sum(SKIPPED_SLEEPS):.1f} s)"
        )
    assert LEDGER.injected > 0
    assert LEDGER.survived == LEDGER.injected
