"""AWS calls per decision and per schedule tick, counted on the guard's own two clients.

Counts are deterministic: botocore's ``before-call`` event fires once per API call the guard makes
(botocore's own retries underneath are not calls the guard chose). The tick is meant to cost a
bounded number of calls per page of groups and per page of the table, plus what each instance
inherently needs: one heartbeat for a busy waiting instance (``RecordLifecycleActionHeartbeat`` has
no batch form), or the release and its ``CompleteLifecycleAction``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from busy_guard import schema
from busy_guard.sandbox.clock import ManualClock
from busy_guard.writer import end_destructive_op_sync
from tests.bench import _support
from tests.bench._support import AwsCalls, breakdown, heading, note, table

GROUP = "graph-db"
LISTING = ("DescribeAutoScalingGroups", "Scan", "BatchGetItem")


def run(quick: bool) -> None:
    heading("2. AWS calls per decision and per tick")
    _per_decision()
    _per_tick(quick)


# --- per decision ----------------------------------------------------------------------------------
def _per_decision() -> None:
    rows: list[list[Any]] = []

    def record(situation: str, trigger: str, counts: Counter[str], step: str) -> None:
        listing = sum(counts[name] for name in LISTING)
        rows.append([situation, trigger, step, breakdown(counts), sum(counts.values()) - listing, listing])

    clock = ManualClock(_support.START)
    with _support.world({GROUP: 12}, clock) as sb:
        free = list(sb.instances(GROUP))
        calls = AwsCalls(_support.guard_clients(sb))
        step = _last_step(sb)

        idle = free.pop()
        [idle_event] = sb.terminate(idle)
        record("idle", "lifecycle event", calls.take(), step())

        busy = free.pop()
        lease = _begin(sb, busy)
        sb.terminate(busy)
        record("busy, first look", "lifecycle event", calls.take(), step())
        clock.advance(60)
        sb.tick()
        record("busy, later look", "schedule tick", calls.take(), step())
        end_destructive_op_sync(busy, lease)
        sb.pump_stream()
        record("last lease ended", "table stream", calls.take(), step())

        lost = free.pop()
        lease = _begin(sb, lost)
        sb.terminate(lost)
        calls.take()
        step()
        end_destructive_op_sync(lost, lease)  # its stream record is read (and dropped) below
        sb._new_stream_records()
        clock.advance(60)
        sb.tick()
        record("last lease ended, stream record lost", "schedule tick", calls.take(), step())

        crashed = free.pop()
        _support.put_items(sb, _support.busy_items([crashed], clock(), lease_ttl=180))
        sb.terminate(crashed)
        clock.advance(180)
        sb.tick()
        calls.take()
        step()
        clock.advance(60)
        sb.tick()
        record("stale: the writer crashed, its lease expired", "schedule tick", calls.take(), step())

        clock.advance(5)
        sb.invoke(idle_event)
        record("already released (duplicate event)", "lifecycle event", calls.take(), step())

        adopted_idle = free.pop()
        sb.terminate(adopted_idle, deliver=False)
        clock.advance(60)
        sb.tick()
        record("idle, event lost (adopted)", "schedule tick", calls.take(), step())

        adopted_busy = free.pop()
        _begin(sb, adopted_busy)
        sb.terminate(adopted_busy, deliver=False)
        clock.advance(60)
        sb.tick()
        record("busy, event lost (adopted)", "schedule tick", calls.take(), step())
        calls.close()

    clock = ManualClock(_support.START)
    with _support.world({GROUP: 2}, clock, env={"BUSY_GUARD_MAX_WAIT_SECONDS": "3600"}) as sb:
        instance = sb.instances(GROUP)[0]
        _begin(sb, instance, lease_ttl=10 * 3600)
        sb.terminate(instance)
        for _ in range(11):
            clock.advance(300)
            sb.tick()
        calls = AwsCalls(_support.guard_clients(sb))
        step = _last_step(sb)
        clock.advance(300)
        sb.tick()
        record("max_wait exceeded (live work)", "schedule tick", calls.take(), step())
        calls.close()

    table(
        ["situation", "trigger", "outcome", "calls", "per instance", "tick's listing"],
        rows,
        right=[4, 5],
    )
    note(
        """"per instance" is what the decision itself costs; "tick's listing" is the tick's fixed part
        (DescribeAutoScalingGroups per 50 groups, Scan per MB of table, BatchGetItem per 100 waiting
        instances the scan did not return), shared by every instance in the tick: see the next table.
        A busy instance costs 2 calls on its first look and 1 heartbeat a minute after that; a
        release costs the conditional UpdateItem that claims it plus CompleteLifecycleAction."""
    )


def _last_step(sb: Any) -> Callable[[], str]:
    """What the hook saw since the previous look: completed, heartbeat, or nothing."""
    seen = {"n": len(sb.emulator.timeline())}

    def outcome() -> str:
        timeline = sb.emulator.timeline()
        new = timeline[seen["n"] :]
        seen["n"] = len(timeline)
        names = {"complete": "completed", "heartbeat": "heartbeat", "rejected": "rejected"}
        whats = sorted({names[entry.what] for entry in new if entry.what in names})
        return ", ".join(whats) or "no hook call"

    return outcome


def _begin(sb: Any, instance_id: str, lease_ttl: float = 3600) -> Any:
    return sb.begin(instance_id, lease_ttl=lease_ttl)


# --- per tick ---------------------------------------------------------------------------------------
def _per_tick(quick: bool) -> None:
    layouts: list[tuple[int, int]] = [(1, 1), (1, 10), (1, 100), (10, 100)]
    if not quick:
        layouts.append((100, 100))
    rows: list[list[Any]] = []
    item_bytes: list[tuple[str, int]] = []
    for groups, waiting in layouts:
        rows.extend(_tick_rows(groups, waiting, item_bytes if not item_bytes else None))
    refresh = _support.refresh_world(quick)
    rows.append(_figure_row(1, refresh.size, "events lost: first tick adopts", refresh.adoption))
    rows.append(_figure_row(1, refresh.size, "all marked: steady tick", refresh.steady_tick(16)))
    table(
        [
            "groups",
            "waiting",
            "tick",
            "Describe",
            "Scan",
            "BatchGet",
            "UpdateItem",
            "Heartbeat",
            "Complete",
            "total",
        ],
        rows,
        right=[0, 1, *range(3, 10)],
    )
    per_page = {label: 1_048_576 // size for label, size in item_bytes}
    note(
        f"""Describe = ceil(groups / 50) whatever the instance count: AWS returns every instance of a
        group in its group's entry, and the guard names at most 50 groups a call. BatchGetItem =
        ceil(unknown waiting instances / 100), only on a tick that finds waiting instances the scan did
        not return (their events were lost or are still in flight). Scan = ceil(table size / 1 MB): a
        Scan page reads 1 MB of items before the filter, and the table holds one item per instance
        that ever took a lease, kept until 7 days after its release. Item sizes (by DynamoDB's sizing
        rules, approximately): {", ".join(f"{label} {size} B" for label, size in item_bytes)}: one
        page holds about {min(per_page.values()):,} to {max(per_page.values()):,} items, so the moto
        scans above were one page each, and a 10,000-instance fleet costs about
        {math.ceil(10_000 * max(s for _, s in item_bytes) / 1_048_576)} Scan pages a minute."""
    )
    note(
        """Everything else is per instance and inherent: one RecordLifecycleActionHeartbeat per busy
        waiting instance per tick (no batch form exists), one conditional UpdateItem plus one
        CompleteLifecycleAction per release. No tick makes a per-instance describe or read."""
    )


def _tick_rows(groups: int, waiting: int, item_bytes: list[tuple[str, int]] | None) -> list[list[Any]]:
    names = {f"g{n:03d}": waiting // groups for n in range(groups)}
    clock = ManualClock(_support.START)
    with _support.world(names, clock) as sb:
        ids = [i for group in names for i in sb.instances(group)]
        _support.put_items(sb, _support.busy_items(ids, clock()))
        _support.start_terminations(sb, ids, deliver=False)
        adoption = _support.run_tick(sb, clock)
        steady = _support.run_tick(sb, clock)
        if item_bytes is not None:
            item_bytes.extend(_item_sizes(sb, ids[0]))
    return [
        _figure_row(groups, waiting, "events lost: first tick adopts", adoption),
        _figure_row(groups, waiting, "all marked: steady tick", steady),
    ]


def _figure_row(groups: int, waiting: int, label: str, figure: _support.TickFigure) -> list[Any]:
    c = figure.calls
    return [
        groups,
        waiting,
        label,
        c["DescribeAutoScalingGroups"],
        c["Scan"],
        c["BatchGetItem"],
        c["UpdateItem"],
        c["RecordLifecycleActionHeartbeat"],
        c["CompleteLifecycleAction"],
        figure.total,
    ]


def _item_sizes(sb: Any, instance_id: str) -> list[tuple[str, int]]:
    busy = sb.dynamodb.get_item(TableName=sb.table_name, Key=schema.key(instance_id), ConsistentRead=True)[
        "Item"
    ]
    released = dict(busy)
    released.pop(schema.LEASES)
    released.pop(schema.DRAINING, None)
    released[schema.COUNTER] = schema.num(0)
    released[schema.RELEASED] = schema.released_value(
        schema.Released(at=_support.START, reason="idle", by="busy-guard")
    )
    released[schema.TTL] = schema.num(_support.START + 7 * 86400)
    return [("busy and draining", item_size(busy)), ("released", item_size(released))]


def item_size(item: dict[str, Any]) -> int:
    """DynamoDB's item size: attribute names plus values (strings by UTF-8 length, numbers about one byte
    per two digits plus one, 3 bytes per map or list plus 1 per element)."""
    return sum(len(name.encode()) + _value_size(value) for name, value in item.items())


def _value_size(value: dict[str, Any]) -> int:
    ((kind, inner),) = value.items()
    if kind == "S":
        return len(inner.encode())
    if kind == "N":
        digits = inner.lstrip("-").replace(".", "").strip("0") or "0"
        return math.ceil(len(digits) / 2) + 1
    if kind == "SS":
        return sum(len(s.encode()) for s in inner)
    if kind == "BOOL" or kind == "NULL":
        return 1
    if kind == "M":
        return 3 + sum(len(k.encode()) + _value_size(v) + 1 for k, v in inner.items())
    if kind == "L":
        return 3 + sum(_value_size(v) + 1 for v in inner)
    return len(str(inner))
