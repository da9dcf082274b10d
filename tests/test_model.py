"""A model-based test of the whole system: hypothesis drives the sandbox (moto, the lifecycle-hook
emulator behind the real boto3 client, the real writer library and the real guard handler) through
random interleavings, and checks the guard's promises after every step.

Rules: writers begin, end, renew or crash; terminations (instance refresh with a replacement,
scale-in, return to a warm pool) whose lifecycle events are delivered, lost, duplicated or late;
stream batches delivered or lost; schedule ticks and the clock moving; injected Auto Scaling and
DynamoDB faults; an operator's release; a warm instance coming back; an operator draining an
instance in place (``busy-guard drain``'s maintenance mark, set and later cleared).

Invariants, after every step:
- no instance leaves our hook's wait while the table held a live lease for it, unless max_wait had
  passed or an operator released it;
- every termination is completed within max_wait plus two ticks (plus the ticks that failed);
- every item's counter equals its number of leases;
- no lease is accepted on an instance already marked draining or in maintenance;
- the guard never takes a maintenance mark for a termination: it never clears one, and never marks
  an instance draining that was not terminated (a termination during maintenance is held like any
  other while a live lease exists: the first invariant);
- at most one guard completion per termination;
- no hook of ours times out while the guard runs (some tick between a heartbeat falling due and
  the hook's timeout succeeded).

Budget: ``make test`` runs a bounded profile (``BUSY_GUARD_MODEL_EXAMPLES`` examples of
``BUSY_GUARD_MODEL_STEPS`` steps, small defaults); ``make soak`` runs a long one.
``BUSY_GUARD_MODEL_ENGINE=dynamodb-local`` keeps the table and its stream on Amazon DynamoDB Local
instead of moto (Auto Scaling stays on moto and the emulator either way).
"""

from __future__ import annotations

import os
import threading
import types
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any
from unittest import mock

import botocore.endpoint
from botocore.awsrequest import AWSResponse
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from busy_guard import identity, schema
from busy_guard.guard.autoscaling import LifecycleHooks
from busy_guard.guard.table import BusyTable
from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.dynamodb_local import DynamoDBLocal
from busy_guard.sandbox.hooks import Completion
from busy_guard.sandbox.world import HOOK, Sandbox, SandboxSettings
from busy_guard.settings import Env, heartbeat_every_seconds
from busy_guard.writer import InstanceDrainingError, LeaseHandle, begin_destructive_op_sync

EXAMPLES = int(os.environ.get("BUSY_GUARD_MODEL_EXAMPLES", "4"))
STEPS = int(os.environ.get("BUSY_GUARD_MODEL_STEPS", "30"))
START = 1_800_000_000.0
GROUP = "graph-db"
TICK = 60.0
HEARTBEAT_TIMEOUT = 300
MAX_WAIT = 1800.0
LEASE_TTL = 180.0
HEARTBEAT_EVERY = heartbeat_every_seconds(HEARTBEAT_TIMEOUT, TICK)
WORLD = SandboxSettings(
    groups={GROUP: 3},
    heartbeat_timeout=HEARTBEAT_TIMEOUT,
    max_wait=MAX_WAIT,
    max_wait_result="CONTINUE",
    # A real deployment's scheme: items keyed by instance ARN, the replaced system's bare-id items
    # still read (some writers below are legacy ones).
    env={Env.KEY_SCHEME: "isolated", Env.READ_LEGACY_KEYS: "true"},
)
STATS: Counter[str] = Counter()
ENGINES = ("moto", "dynamodb-local")
ENGINE = os.environ.get("BUSY_GUARD_MODEL_ENGINE", "moto")
assert ENGINE in ENGINES, f"BUSY_GUARD_MODEL_ENGINE must be one of {ENGINES}, not {ENGINE!r}"
_servers: list[DynamoDBLocal] = []


def dynamodb_local() -> DynamoDBLocal | None:
    """The engine of the table: None for moto, else one DynamoDB Local for the whole run (each
    example has its own table on it; the server stops at exit)."""
    if ENGINE == "moto":
        return None
    if not _servers:
        _servers.append(DynamoDBLocal.start())
    return _servers[0]


@dataclass
class Lease:
    handle: LeaseHandle
    instance_id: str
    expires_at: float
    crashed: bool = False


@dataclass
class DynamoFault:
    """Answer the guard's next ``left`` DynamoDB requests with a 500, behind its real client."""

    left: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        with self.lock:
            if self.left <= 0:
                return None
            self.left -= 1
        request.url = "https://busy-guard-model-fault.invalid/"
        body = b'{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"injected"}'
        return AWSResponse(request.url, 500, {"Content-Type": "application/x-amz-json-1.0"}, _Raw(body))


class _Raw:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Any:
        yield self._data


class GuardModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(START)
        self.stack = ExitStack()
        # botocore's retry backoff sleeps in real seconds (up to 6 s per injected fault); the model's
        # time is simulated, so the sleeps are counted, not slept.
        skipped = types.SimpleNamespace(sleep=lambda seconds: STATS.update(["retry sleeps skipped"]))
        self.stack.enter_context(mock.patch.object(botocore.endpoint, "time", skipped))
        self.sb = self.stack.enter_context(
            Sandbox.start(WORLD, clock=self.clock, dynamodb_local=dynamodb_local())
        )
        # Injected faults hit the guard's clients only, never the model's own reads and writes.
        self.fault = DynamoFault()
        self.sb.guard.table.client.meta.events.register_first("before-send.dynamodb.*", self.fault)
        # The operator's `busy-guard release` runs with its own clients, as the CLI does.
        self.operator_hooks = LifecycleHooks(self.sb.autoscaling, HOOK)
        self.operator_table = BusyTable(self.sb.dynamodb, self.sb.table_name, keys=self.sb.keys)
        self.maintenance: dict[str, schema.Maintenance] = {}  # instance -> the drain's own mark
        self.terminated: set[str] = set()  # instances whose termination was ever started
        self.leases: list[Lease] = []
        self.boot: dict[str, float] = {i: START - 3600 for i in self.sb.instances(GROUP)}
        self.late_events: list[dict[str, Any]] = []
        self.operator_released: set[str] = set()  # tokens
        self.failed_ticks: list[float] = []
        self.tick_times: list[float] = []
        self.checked = 0  # completions already judged
        self.last_tick = self.clock()
        self.before: dict[str, schema.BusyState] = {}
        STATS["examples"] += 1

    def teardown(self) -> None:
        for lease in self.leases:  # the writers' heartbeat threads must not outlive their world
            lease.handle._stop_heartbeat()
        self.stack.close()

    # --- helpers ----------------------------------------------------------------------------------
    def alive(self) -> list[str]:
        """Instances whose processes can still run work: in the group or waiting to leave it."""
        states = {i: self.sb.emulator.state(i) for i in self.boot}
        return sorted(
            i for i, s in states.items() if s in ("InService", "Terminating:Wait", "Warmed:Pending:Wait")
        )

    def in_service(self) -> list[str]:
        return sorted(i for i in self.boot if self.sb.emulator.state(i) == "InService")

    def warmed(self) -> list[str]:
        return sorted(i for i in self.boot if (self.sb.emulator.state(i) or "").startswith("Warmed:Stopped"))

    def snapshot(self) -> None:
        """Every instance's work before a guard invocation: its ARN item's leases and the legacy
        writers' on its bare-id item (``with_companion_work`` merges them, as ``status`` does)."""
        self.before = {
            i: schema.with_companion_work(replace(self.sb.item(i), legacy=self.sb.item_at(i)))
            for i in self.boot
        }

    def guarded(self, action: Any) -> None:
        """A guard invocation: failures are Lambda's to retry; the next tick repairs them."""
        self.snapshot()
        try:
            action()
        except Exception:
            STATS["failed invocations"] += 1
            return

    def tick(self) -> None:
        def run() -> None:
            try:
                self.sb.tick()
            except Exception:
                self.failed_ticks.append(self.clock())
                raise

        self.tick_times.append(self.clock())
        self.guarded(run)
        self.last_tick = self.clock()
        STATS["ticks"] += 1

    def deliver(self, event: dict[str, Any]) -> None:
        self.guarded(lambda: self.sb.invoke(event))

    # --- writers ----------------------------------------------------------------------------------
    @precondition(lambda self: len(self.leases) < 6)
    @rule(
        data=st.data(),
        ttl=st.sampled_from([LEASE_TTL, 3 * LEASE_TTL]),
        legacy=st.sampled_from([False, False, True]),
    )
    def begin(self, data: st.DataObject, ttl: float, legacy: bool) -> None:
        alive = self.alive()
        if not alive:
            return
        instance = data.draw(st.sampled_from(alive))
        item = self.sb.item(instance)
        identity._boot_time = self.boot[instance]  # the writer's boot time is this instance's
        if legacy:
            # A writer still on the replaced system's scheme: its lease lands on the bare-id item,
            # where no draining mark ever is, so it is never refused; the guard must still wait for it.
            options = self.sb.writer_options(ttl)
            legacy_handle = begin_destructive_op_sync(instance, "legacy_job", key_scheme="legacy", **options)
            assert legacy_handle is not None and legacy_handle.key == instance
            self.leases.append(Lease(legacy_handle, instance, self.clock() + ttl))
            STATS["legacy begins"] += 1
            return
        try:
            handle = self.sb.begin(instance, lease_ttl=ttl)
        except InstanceDrainingError:
            STATS["begins refused" + (" (maintenance)" if instance in self.maintenance else "")] += 1
            return
        except RuntimeError:  # the writer took no lease (it logged why): a refused begin
            return
        # No lease is accepted after the draining mark, nor during maintenance.
        assert item.draining is None, f"lease accepted on draining {instance}"
        assert item.maintenance is None, f"lease accepted on {instance} in maintenance"
        self.leases.append(Lease(handle, instance, self.clock() + ttl))
        STATS["begins"] += 1

    @precondition(lambda self: any(not lease.crashed for lease in self.leases))
    @rule(data=st.data(), how=st.sampled_from(["end", "renew", "crash"]))
    def writer(self, data: st.DataObject, how: str) -> None:
        lease = data.draw(st.sampled_from([lease for lease in self.leases if not lease.crashed]))
        if how == "end":
            Sandbox.end(lease.handle)
            self.leases.remove(lease)
        elif how == "renew":
            if Sandbox.renew(lease.handle):
                item = self.sb.item_at(lease.handle.key, lease.instance_id)
                found = {entry.lease_id: entry for entry in item.leases}
                lease.expires_at = found[lease.handle.lease_id].expires_at
        else:
            lease.crashed = True  # no end, no renewal: its lease expires
            lease.handle._stop_heartbeat()
        STATS[f"writer {how}"] += 1

    # --- terminations and their events ----------------------------------------------------------------
    @rule(
        data=st.data(),
        kind=st.sampled_from(["refresh", "scale-in", "warm-pool"]),
        fate=st.sampled_from(["delivered", "delivered", "lost", "duplicated", "late"]),
    )
    def terminate(self, data: st.DataObject, kind: str, fate: str) -> None:
        candidates = self.in_service()
        if not candidates:
            return
        instance = data.draw(st.sampled_from(candidates))
        self.terminated.add(instance)
        events = self.sb.emulator.terminate(
            instance,
            destination="WarmPool" if kind == "warm-pool" else "EC2",
            should_decrement=kind != "refresh",  # a refresh launches a replacement
        )
        ours = [e for e in events if e["detail"]["LifecycleHookName"] == HOOK]
        for event in ours:
            if fate in ("delivered", "duplicated"):
                self.deliver(event)
            if fate == "duplicated":
                self.deliver(event)
            if fate == "late":
                self.late_events.append(event)
        for new in self.sb.instances(GROUP):
            self.boot.setdefault(new, self.clock())
        STATS[f"terminate {kind} ({fate})"] += 1

    @precondition(lambda self: bool(self.late_events))
    @rule()
    def deliver_late_event(self) -> None:
        self.deliver(self.late_events.pop(0))
        STATS["late events"] += 1

    @rule(lost=st.booleans())
    def stream(self, lost: bool) -> None:
        if lost:
            self.sb._new_stream_records()  # read past them: the batch never arrives
        else:
            self.guarded(self.sb.pump_stream)
        STATS["stream lost" if lost else "stream delivered"] += 1

    @precondition(lambda self: bool(self.warmed()))
    @rule(data=st.data())
    def relaunch(self, data: st.DataObject) -> None:
        instance = data.draw(st.sampled_from(self.warmed()))
        self.sb.emulator.relaunch(instance)
        self.boot[instance] = self.clock()  # a stopped warm pool boots it again
        STATS["relaunch"] += 1

    # --- the schedule and the clock -----------------------------------------------------------------
    @rule(minutes=st.integers(min_value=1, max_value=12))
    def time_passes(self, minutes: int) -> None:
        for _ in range(minutes):
            self.clock.advance(TICK)
            self.tick()
            self.check()

    @rule(seconds=st.floats(min_value=0.5, max_value=30))
    def moment_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        if self.clock() - self.last_tick >= TICK:
            self.tick()

    # --- faults and the operator ------------------------------------------------------------------------
    @rule(
        operation=st.sampled_from(
            [
                "RecordLifecycleActionHeartbeat",
                "CompleteLifecycleAction",
                "DescribeAutoScalingGroups",
                "dynamodb",
            ]
        ),
        count=st.integers(min_value=1, max_value=3),
    )
    def fault(self, operation: str, count: int) -> None:
        if operation == "dynamodb":
            self.fault.left = count
        else:
            guard_client = self.sb.guard.hooks.client
            self.sb.emulator.fail_next(operation, "Throttling", count=count, client=guard_client)
        STATS[f"fault {operation}"] += 1

    @rule(data=st.data())
    def operator_release(self, data: st.DataObject) -> None:
        actions = [a for a in self.sb.emulator.actions() if a.hook_name == HOOK]
        if not actions:
            return
        action = data.draw(st.sampled_from(actions))
        self.operator_released.add(action.token)
        # What `busy-guard release` does: complete the hook, then record it on the item.
        self.operator_hooks.complete(GROUP, action.instance_id, "CONTINUE")
        table = BusyTable(self.sb.dynamodb, self.sb.table_name)
        now = self.clock()
        table.release(
            action.instance_id,
            schema.Released(now, "operator: model", "operator"),
            ttl=now + 3600,
            draining_since=None,
        )
        STATS["operator release"] += 1

    # --- maintenance: an operator drains an instance in place (what `busy-guard drain` writes) ----------
    @precondition(lambda self: len(self.maintenance) < 2)
    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        candidates = [i for i in self.alive() if i not in self.maintenance]
        if not candidates:
            return
        instance = data.draw(st.sampled_from(candidates))
        mark = schema.Maintenance(since=self.clock(), by="operator", reason="model", token=uuid.uuid4().hex)
        taken, state = self.operator_table.begin_maintenance(instance, mark)
        assert taken, f"only the model drains, yet {instance} was in maintenance: {state}"
        self.maintenance[instance] = mark
        STATS["drain"] += 1

    @precondition(lambda self: bool(self.maintenance))
    @rule(data=st.data())
    def undrain(self, data: st.DataObject) -> None:
        instance = data.draw(st.sampled_from(sorted(self.maintenance)))
        mark = self.maintenance.pop(instance)
        cleared, state = self.operator_table.end_maintenance(
            instance, mark, ended_at=self.clock(), result="ok"
        )
        assert cleared, f"{instance}'s maintenance mark was gone before its drain ended it: {state}"
        STATS["undrain"] += 1

    # --- invariants ---------------------------------------------------------------------------------
    @invariant()
    def check(self) -> None:
        self.sb.emulator.apply_timeouts()
        ours = [c for c in self.sb.emulator.completions() if c.hook_name == HOOK]
        for completion in ours[self.checked :]:
            if completion.by == "timeout":
                self.check_timeout(completion)
                continue
            if completion.token in self.operator_released:
                continue
            before = self.before.get(completion.instance_id)
            live = [lease for lease in (before.leases if before else ()) if lease.expires_at > completion.at]
            waited = completion.wait_seconds
            assert not live or waited >= MAX_WAIT - 1, (
                f"{completion.instance_id} left the wait after {waited:.0f}s with live leases {live}"
            )
            STATS["completions judged"] += 1
        self.checked = len(ours)
        tokens = Counter(c.token for c in ours if c.by == "guard")
        assert all(n == 1 for n in tokens.values()), tokens
        now = self.clock()
        for action in self.sb.emulator.actions():
            if action.hook_name != HOOK or action.token in self.operator_released:
                continue
            failed = sum(1 for at in self.failed_ticks if at >= action.started_at)
            allowed = MAX_WAIT + (2 + failed) * TICK
            assert now - action.started_at <= allowed, (
                f"{action.instance_id} waits {now - action.started_at:.0f}s"
            )
        for instance in self.boot:
            item = self.sb.item(instance)
            if item.exists:
                assert (item.counter or 0) == len(item.leases) + item.corrupt_leases, item
            self.check_maintenance(instance, item)

    def check_timeout(self, completion: Completion) -> None:
        """No hook of ours times out while the guard runs. A heartbeat is due ``HEARTBEAT_EVERY``
        after the last one (or the start of the wait) and the hook times out ``HEARTBEAT_TIMEOUT``
        after it, so some tick in between must have heartbeat it, unless every tick in that span
        failed (the fault rules can fail several in a row): then the guard did not run, and Auto
        Scaling's DefaultResult is the designed outcome (DESIGN.md: "if the guard itself is broken,
        terminations still happen")."""
        span_start = completion.at - HEARTBEAT_TIMEOUT + HEARTBEAT_EVERY
        span = [at for at in self.tick_times if span_start <= at < completion.at]
        failed = set(self.failed_ticks)
        assert span and all(at in failed for at in span), (
            f"our hook timed out while the guard ran: {completion}; ticks since the heartbeat was due: "
            f"{[(at - span_start, at in failed) for at in span]}"
        )
        STATS["timeouts while every tick failed"] += 1

    def check_maintenance(self, instance: str, item: schema.BusyState) -> None:
        """The guard never takes a maintenance mark for a termination: it never clears or changes
        one, and it marks draining only an instance whose termination was started."""
        mark = self.maintenance.get(instance)
        if mark is not None:
            assert item.maintenance == mark, f"{instance}: the drain's mark changed to {item.maintenance}"
        if item.draining is not None:
            assert instance in self.terminated, f"{instance} marked draining, never terminated: {item}"
        if mark is not None and item.draining is not None and item.leases:
            STATS["terminating in maintenance, with leases"] += 1


GuardModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGuardModel = GuardModel.TestCase


def test_model_report() -> None:
    """Runs after the machine (file order): what the examples did, for the note."""
    print(f"\nmodel on {ENGINE}: {dict(sorted(STATS.items()))}")
