"""Heartbeat calls per schedule tick for 1, 100 and 1,000 held instances, before and after
"heartbeat only when due".

The guard's real tick (its clients, planner and executor) against the canned AWS of ``_fake_aws``,
every instance busy and already marked draining, over 30 one-minute ticks of simulated time (two
periods of a 900 s hook's 300 s heartbeat interval). *Before* is the old protocol, a heartbeat on
every tick: the same guard with the due interval set to zero. Counted calls, no wall clock.
"""

from __future__ import annotations

from unittest import mock

from busy_guard import settings
from busy_guard.sandbox.clock import ManualClock
from tests.bench import _support
from tests.bench._fake_aws import fake_world

TICKS = 30
SIZES = (1, 100, 1000)


def heartbeats_per_tick(size: int, *, every_tick: bool, ticks: int = TICKS) -> list[int]:
    clock = ManualClock(_support.START)
    with fake_world(size, busy=True, now=clock()) as fake:
        guard = fake.guard(clock, 16)
        fake.mark_all_draining(clock())
        counts = []
        due = (lambda *_: 0.0) if every_tick else settings.heartbeat_every_seconds
        with mock.patch.object(settings, "heartbeat_every_seconds", due):
            for _ in range(ticks):
                clock.advance(60)
                before = fake.heartbeats
                report = guard.tick()
                if report.errors:
                    raise RuntimeError(f"the fake tick failed: {report.errors[0]}")
                counts.append(fake.heartbeats - before)
        return counts


def run(quick: bool) -> None:
    sizes = SIZES[:2] if quick else SIZES
    _support.emit("## Heartbeat calls per tick (900 s hook, one-minute ticks, every instance held)")
    _support.emit()
    rows = []
    for size in sizes:
        before = heartbeats_per_tick(size, every_tick=True)
        after = heartbeats_per_tick(size, every_tick=False)
        rows.append(
            (
                f"{size:,}",
                f"{sum(before) / len(before):g}",
                f"{max(before):,}",
                f"{sum(after) / len(after):g}",
                f"{max(after):,}",
                f"{sum(after) / max(sum(before), 1):.0%}",
            )
        )
    _support.table(
        ["held", "before: mean/tick", "before: peak", "after: mean/tick", "after: peak", "after/before"],
        rows,
        right=range(1, 6),
    )
    _support.emit()
