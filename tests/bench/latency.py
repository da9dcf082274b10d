"""Release latency on the sandbox's simulated clock.

From the end of the last lease (or the crash of a writer) to ``CompleteLifecycleAction``, through
each path the guard has: the filtered table stream, the one-minute schedule, lease expiry, and the
legacy stale window the replaced system used. Times are simulated seconds on a ``ManualClock``, so
they are exact and repeatable (seeded offsets); the wall time the guard spent is printed beside them.
"""

from __future__ import annotations

import random
from typing import Any

from busy_guard import schema
from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.world import matches
from busy_guard.writer import end_destructive_op_sync
from tests.bench import _support
from tests.bench._support import heading, note, table

TICK = 60.0  # the schedule's rate, rate(1 minute)
LEASE_TTL = 180.0
CLOCK_SKEW = 30.0
OLD_POLL = 60.0
OLD_STALE = 6 * 3600.0
GROUP = "graph-db"
SEED = 6


def run(quick: bool) -> None:
    heading("1. Release latency (simulated seconds on the sandbox's clock)")
    counts = {"stream": 4 if quick else 10, "schedule": 12 if quick else 30, "crash": 12 if quick else 30}
    rng = random.Random(SEED)
    clock = ManualClock(_support.START)
    size = sum(counts.values()) + 2
    with _support.world({GROUP: size}, clock) as sb:
        free = list(sb.instances(GROUP))
        stream, stream_wall, gated = _stream_path(
            sb, clock, [free.pop() for _ in range(counts["stream"])], rng
        )
        schedule = _schedule_path(sb, clock, [free.pop() for _ in range(counts["schedule"])], rng)
        crash = _crashed_writers(sb, clock, [free.pop() for _ in range(counts["crash"])], rng)
        legacy = _legacy_marker(sb, clock, free.pop(), rng)

    rows = [
        _row("last lease ended, via the stream", stream, f"up to {OLD_POLL:.0f} s (60 s polling)"),
        _row("last lease ended, stream lost: next tick", schedule, f"up to {OLD_POLL:.0f} s (60 s polling)"),
        _row(
            "writer crashed (lease 180 s, skew 30 s, tick)",
            crash,
            f"{OLD_STALE / 3600:.0f} h stale window + up to {OLD_POLL:.0f} s",
        ),
        _row(
            "legacy marker, writer crashed (old rule)",
            [legacy],
            f"{OLD_STALE / 3600:.0f} h stale window + up to {OLD_POLL:.0f} s",
        ),
    ]
    table(
        ["path", "samples", "min", "median", "p90", "max", "replaced system"],
        rows,
        right=[1, 2, 3, 4, 5],
    )
    note(
        f"""Stream path: the guard completes the hook in the very invocation that receives the stream
        record, so the simulated latency is 0 s. What reality adds is the event source's delivery (Lambda
        polls a DynamoDB stream's shards about four times a second and the stack sets no batching
        window, so typically well under a second: an assumption from AWS's documentation, not
        measured here) plus the invocation itself: median {_support.ms(stream_wall)} of wall time on
        moto here. Only the last lease's end wakes the guard: with two leases, the first
        end delivered {gated} record(s) through the event-source filter."""
    )
    note(
        f"""Schedule path: ends at {counts["schedule"]} seeded random offsets within one minute; the
        next tick releases each, so the latency is uniform on (0, {TICK:.0f}] s: the same as the
        replaced system's polling, now only the backstop. Ticks are modelled exactly {TICK:.0f} s apart;
        EventBridge may deliver a scheduled event some seconds late, which adds to it."""
    )
    note(
        f"""Crashed writer: the writer renews its lease every 60 s; the crash falls at a random point
        0-60 s after the last renewal, the lease expires {LEASE_TTL:.0f} s after that renewal, the
        guard waits {CLOCK_SKEW:.0f} s of clock-skew allowance more and releases at the next tick: at
        most {LEASE_TTL + CLOCK_SKEW + TICK:.0f} s after the last renewal, against
        {OLD_STALE / 3600:.0f} h ({OLD_STALE:,.0f} s) for the replaced system's markers, which busy-guard
        still reads by the old rule (last row: an old-format counter item whose writer died)."""
    )


def _row(label: str, values: list[float], old: str) -> list[Any]:
    return [
        label,
        len(values),
        _seconds(min(values)),
        _seconds(_support.median(values)),
        _seconds(_support.percentile(values, 0.9)),
        _seconds(max(values)),
        old,
    ]


def _seconds(value: float) -> str:
    return f"{value:,.1f} s" if value < 3600 else f"{value:,.0f} s ({value / 3600:.2f} h)"


def _begin(sb: Any, instance_id: str) -> Any:
    return sb.begin(instance_id, lease_ttl=3600)


def _completed_at(sb: Any, instance_id: str) -> float:
    [completion] = [c for c in sb.emulator.completions(instance_id) if c.by == "guard"]
    return completion.at


def _next_tick(now: float) -> float:
    return (now // TICK + 1) * TICK


def _stream_records(sb: Any) -> list[dict[str, Any]]:
    """What the event source would deliver: new stream records that pass the stack's filter."""
    return [r for r in sb._new_stream_records() if matches(schema.stream_filter_pattern(), r)]


def _stream_path(
    sb: Any, clock: ManualClock, instances: list[str], rng: random.Random
) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    walls: list[float] = []
    gated = 0
    for position, instance_id in enumerate(instances):
        leases = [_begin(sb, instance_id) for _ in range(2 if position == 0 else 1)]
        sb.terminate(instance_id)
        _stream_records(sb)  # the guard's own look is filtered out; drop it
        clock.advance(rng.uniform(1, 50))  # the work goes on
        if len(leases) == 2:
            end_destructive_op_sync(instance_id, leases.pop())
            gated = len(_stream_records(sb))
            clock.advance(rng.uniform(1, 5))
        ended = clock()
        end_destructive_op_sync(instance_id, leases.pop())
        records = _stream_records(sb)
        invoked = _support.timed(sb.invoke, {"Records": records}, "stream")
        walls.append(invoked.seconds)
        latencies.append(_completed_at(sb, instance_id) - ended)
    return latencies, _support.median(walls), gated


def _schedule_path(sb: Any, clock: ManualClock, instances: list[str], rng: random.Random) -> list[float]:
    leases = {instance_id: _begin(sb, instance_id) for instance_id in instances}
    for instance_id in instances:
        sb.terminate(instance_id)
    clock.set(_next_tick(clock()))
    sb.tick()  # heartbeats every waiting instance
    minute = clock()
    ends = sorted((rng.uniform(0, TICK), instance_id) for instance_id in instances)
    ended: dict[str, float] = {}
    for offset, instance_id in ends:
        clock.set(minute + offset)
        ended[instance_id] = clock()
        end_destructive_op_sync(instance_id, leases[instance_id])  # its stream record is lost
    clock.set(minute + TICK)
    sb.tick()
    return [_completed_at(sb, i) - ended[i] for i in instances]


def _crashed_writers(sb: Any, clock: ManualClock, instances: list[str], rng: random.Random) -> list[float]:
    """Each writer's last renewal falls within one minute; it dies 0-60 s later, never ending its lease."""
    window = _next_tick(clock())
    renewals = sorted((window + rng.uniform(0, TICK), instance_id) for instance_id in instances)
    crashed: dict[str, float] = {}
    for renewed, instance_id in renewals:
        clock.set(renewed)
        _support.put_items(sb, _support.busy_items([instance_id], renewed, lease_ttl=LEASE_TTL))
        sb.terminate(instance_id)  # the termination is waiting on the live lease
        crashed[instance_id] = renewed + rng.uniform(0, 60)
    tick = window + TICK
    while any(not sb.emulator.completions(i) for i in instances):
        clock.set(tick)
        sb.tick()
        tick += TICK
        if tick - window > 3600:
            raise RuntimeError("crashed writers were never released")
    return [_completed_at(sb, i) - crashed[i] for i in instances]


def _legacy_marker(sb: Any, clock: ManualClock, instance_id: str, rng: random.Random) -> float:
    """An old-format item (a counter and an ISO timestamp, no lease) whose writer died."""
    clock.set(_next_tick(clock()) + rng.uniform(0, TICK))
    died = clock()
    sb.dynamodb.put_item(
        TableName=sb.table_name,
        Item={
            schema.INSTANCE_ID: {"S": instance_id},
            schema.COUNTER: {"N": "1"},
            schema.LAST_OP_AT: {"S": schema.iso(died)},
        },
    )
    sb.terminate(instance_id)
    tick = _next_tick(died)
    while not sb.emulator.completions(instance_id):
        clock.set(tick)
        sb.tick()
        # Five-minute steps keep the 15-minute hook alive; single minutes near the window's end.
        tick += 300.0 if tick - died < OLD_STALE - 600 else TICK
        if tick - died > OLD_STALE + 3600:
            raise RuntimeError("the legacy marker was never released")
    return _completed_at(sb, instance_id) - died
