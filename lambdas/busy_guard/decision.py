"""The guard's decision: a pure function of an instance's state, the configuration and the time.

Exactly DESIGN.md's decision table; no I/O, so it is tested exhaustively with hypothesis and the
CLI's ``status`` shows what the guard would do with the very same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from busy_guard.schema import BusyState, Lease

HOUR = 3600.0
MAX_KINDS_TEXT = 200  # characters of lease kinds in a decision's detail
MAX_KIND, MAX_KINDS = 64, 20  # a kind is whatever string a writer passed: bounded in lease_kinds


class Action(StrEnum):
    CONTINUE = "CONTINUE"
    ABANDON = "ABANDON"
    WAIT = "WAIT"


class Reason(StrEnum):
    IDLE = "idle"
    STALE = "stale"
    BUSY = "busy"
    MAX_WAIT_EXCEEDED = "max_wait_exceeded"
    STATE_UNAVAILABLE = "state_unavailable"


@dataclass(frozen=True)
class DecisionConfig:
    max_wait: float = 12 * HOUR
    max_wait_result: Action = Action.CONTINUE
    clock_skew: float = 30.0
    legacy_stale_after: float = 6 * HOUR

    def __post_init__(self) -> None:
        if self.max_wait_result not in (Action.CONTINUE, Action.ABANDON):
            raise ValueError(f"max_wait_result must be CONTINUE or ABANDON, not {self.max_wait_result}")
        for name in ("max_wait", "clock_skew", "legacy_stale_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(frozen=True)
class StateUnavailable:
    """The table could not be read. ``waiting_since`` is the best known start of the wait."""

    instance_id: str
    waiting_since: float | None
    error: str


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason
    detail: str = ""
    stale_markers: int = 0
    live_leases: int = 0
    # The kinds of the leases the decision is about (live ones that hold, or expired ones judged
    # stale): for the events people read. Sorted, distinct.
    lease_kinds: tuple[str, ...] = ()

    @property
    def completes(self) -> bool:
        return self.action is not Action.WAIT


def decide(state: BusyState | StateUnavailable, config: DecisionConfig, now: float) -> Decision:
    if isinstance(state, BusyState) and state.legacy is not None:
        own = decide(replace(state, legacy=None), config, now)
        return with_companion(own, decide(companion_of(state), config, now))
    since = state.waiting_since if isinstance(state, StateUnavailable) else _since(state)
    if since is not None and now - since >= config.max_wait:
        return Decision(
            config.max_wait_result,
            Reason.MAX_WAIT_EXCEEDED,
            f"waited {now - since:.0f}s, max_wait is {config.max_wait:.0f}s",
        )
    if isinstance(state, StateUnavailable):
        return Decision(Action.WAIT, Reason.STATE_UNAVAILABLE, state.error)

    live = [lease for lease in state.leases if lease.is_live(now, config.clock_skew)]
    expired = len(state.leases) - len(live)
    legacy_live, legacy_stale = _legacy_markers(state, config, now)
    if live or legacy_live:
        detail = f"{len(live)} live lease(s) {_kinds(live)}" if live else ""
        if legacy_live:
            detail = f"{detail}; {legacy_live} legacy marker(s)".lstrip("; ")
        return Decision(
            Action.WAIT, Reason.BUSY, detail, live_leases=len(live) + legacy_live, lease_kinds=_kind_set(live)
        )
    stale = expired + legacy_stale
    if stale:
        return Decision(
            Action.CONTINUE,
            Reason.STALE,
            f"{stale} expired or stale marker(s)",
            stale_markers=stale,
            lease_kinds=_kind_set(state.leases),
        )
    return Decision(Action.CONTINUE, Reason.IDLE)


def companion_of(state: BusyState) -> BusyState:
    """The bare-id companion of an ARN-keyed item, as its work is judged: only its leases and
    markers count. Its own ``draining`` or ``released`` (left by a guard of the legacy scheme) are
    not this termination's, so they start no wait and end none."""
    assert state.legacy is not None
    return replace(state.legacy, draining=None, released=None, legacy=None)


def with_companion(own: Decision, companion: Decision) -> Decision:
    """One decision for an instance whose work may sit on two items: the wait (and max_wait) is the
    ARN-keyed item's; live work on either holds it; otherwise stale on either is stale."""
    if not own.completes or own.reason is Reason.MAX_WAIT_EXCEEDED or companion.reason is Reason.IDLE:
        return own
    if not companion.completes:
        return Decision(
            Action.WAIT,
            Reason.BUSY,
            f"legacy (bare-id) item: {companion.detail}",
            live_leases=companion.live_leases,
            lease_kinds=companion.lease_kinds,
        )
    stale = own.stale_markers + companion.stale_markers
    kinds = tuple(sorted({*own.lease_kinds, *companion.lease_kinds}))[:MAX_KINDS]
    return Decision(
        Action.CONTINUE,
        Reason.STALE,
        f"{stale} expired or stale marker(s)",
        stale_markers=stale,
        lease_kinds=kinds,
    )


def _kind_set(leases: Sequence[Lease]) -> tuple[str, ...]:
    return tuple(sorted({lease.kind[:MAX_KIND] for lease in leases}))[:MAX_KINDS]


def _kinds(leases: list[Lease]) -> str:
    """The kinds of the live leases, for the decision's detail. Bounded: it is logged on every look,
    and a kind is whatever string a writer passed."""
    text = repr(sorted({lease.kind for lease in leases}))
    return text if len(text) <= MAX_KINDS_TEXT else text[: MAX_KINDS_TEXT - 3] + "..."


def _since(state: BusyState) -> float | None:
    # An unreadable mark parses as since=0: the start of the wait is unknown, not the epoch.
    if state.draining is None or state.draining.since <= 0:
        return None
    return state.draining.since


def _legacy_markers(state: BusyState, config: DecisionConfig, now: float) -> tuple[int, int]:
    """(live, stale) counts of markers judged by the old rules: busy unless the newest timestamp
    is older than the stale window. A marker without a readable time cannot be proven stale."""
    live = stale = 0
    untracked = state.untracked_ops
    if untracked > 0:
        if _fresh(state.last_op_at, config, now):
            live += untracked
        else:
            stale += untracked
    if state.legacy_leases:
        times = [lease.started_at for lease in state.legacy_leases if lease.started_at is not None]
        newest = max(times) if len(times) == len(state.legacy_leases) else None
        if newest is None or _fresh(newest, config, now):
            live += len(state.legacy_leases)
        else:
            stale += len(state.legacy_leases)
    return live, stale


def _fresh(timestamp: float | None, config: DecisionConfig, now: float) -> bool:
    return timestamp is None or now - timestamp < config.legacy_stale_after
