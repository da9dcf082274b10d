"""The guard's protocol as pure functions, beside ``decide()``: no I/O, no clock, no boto3.

- :func:`plan_reads` and :func:`plan_tick`: what one schedule tick must look at, from Auto Scaling's
  listing, the table's items and the configuration.
- :func:`first_step` and :func:`next_step`: the protocol for one instance, as a chain of steps. Each
  step is data (release if idle, mark draining, claim, heartbeat, complete, record gone, ...); the
  executor (``reconcile.Guard``) runs it through an adapter and feeds the answer back, until
  :class:`Done`.

What a trigger knows travels as data in the :class:`Request` (when the wait started, a ``not_before``,
a copy of the item); nothing here asks which trigger it was. A copy of the item only says where to
look and what to try first: every release is a conditional write whose condition proves the
decision on the item itself (``schema.Proof``).

Calls per decision on the common paths:
    idle, first look       release-if-idle + CompleteLifecycleAction                 = 2
    busy, first look       release-if-idle (refused) + mark draining                 = 2
    busy, later tick       nothing, until a heartbeat is due (a third of the timeout)  = 0
    busy, heartbeat due    RecordLifecycleActionHeartbeat + record it on the item     = 2
    last lease ended       claim (the stream's copy says idle; the item proves it) + Complete = 2
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from busy_guard import schema, settings
from busy_guard.decision import (
    Action,
    Decision,
    DecisionConfig,
    Reason,
    StateUnavailable,
    companion_of,
    decide,
)
from busy_guard.guard.autoscaling import IN_SERVICE, GroupInstance, HookResult
from busy_guard.schema import BusyState, Draining, Proof, Released
from busy_guard.settings import INSTANCE_ID_PATTERN

GONE = "gone"


class End(StrEnum):
    """How one reconcile ended, for logs, metrics and tests."""

    COMPLETED = "completed"  # we completed the lifecycle action
    ALREADY_DONE = "already_done"  # released or completed before us: nothing to do
    HEARTBEAT = "heartbeat"  # still waiting; the hook's timeout was restarted
    WAITING = "waiting"  # still waiting; no heartbeat due yet
    RELEASED_GONE = "released_gone"  # the instance is no longer waiting on our hook
    SKIPPED = "skipped"  # waiting on another hook after we finished
    DEFERRED = "deferred"  # no time left in this invocation: the next trigger goes on


# --- what a trigger brings ----------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One instance to reconcile, and the facts its trigger brought (as data)."""

    instance_id: str
    asg: str
    source: str = ""  # for the logs only: event, stream, schedule, ...
    # When our hook's wait started (the lifecycle event's ``time``): the start of max_wait, and the
    # hook's timer, so no heartbeat is due before a third of its timeout.
    wait_started: float | None = None
    # A release at or after this time already finished this termination (the event's time).
    not_before: float = 0.0
    # A copy of the item (the tick's scan or batch read, a stream image): where to look first.
    seen: BusyState | None = None
    # A wait that may be another hook's (a warm-pool return without our event): heartbeat our
    # hook first; "no active action" means it is not ours, and nothing is recorded.
    probe: bool = False
    # A recorded release still waiting: prove it again on the item, then complete it again.
    recorded: Released | None = None


@dataclass(frozen=True)
class Policy:
    """The configuration and the facts of this pass that the protocol needs."""

    decision: DecisionConfig
    hook_name: str
    heartbeat_every: float  # seconds after the last heartbeat that the next one is due
    released_ttl: float
    actor: str
    now: float


# --- the steps ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleaseIfIdle:
    released: Released
    ttl: float
    not_before: float


@dataclass(frozen=True)
class MarkDraining:
    draining: Draining


@dataclass(frozen=True)
class Claim:
    """Move ``draining`` to ``released``, on the condition that proves the decision."""

    released: Released
    ttl: float
    draining_since: float | None
    proof: Proof | None


@dataclass(frozen=True)
class Heartbeat:
    pass


@dataclass(frozen=True)
class RecordHeartbeat:
    draining_since: float
    at: float


@dataclass(frozen=True)
class Complete:
    result: Action


@dataclass(frozen=True)
class RecordGone:
    released: Released
    ttl: float
    draining_since: float | None


@dataclass(frozen=True)
class Recheck:
    released_at: float
    proof: Proof


@dataclass(frozen=True)
class Confirm:
    released_at: float


@dataclass(frozen=True)
class Done:
    end: End
    decision: Decision | None = None
    waited: float | None = None
    detail: str = ""
    problems: tuple[str, ...] = ()


Step = (
    ReleaseIfIdle
    | MarkDraining
    | Claim
    | Heartbeat
    | RecordHeartbeat
    | Complete
    | RecordGone
    | Recheck
    | Confirm
    | Done
)


# --- the answers ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Written:
    """A conditional write's answer: whether it was made, and the item (before it, or the current
    item when the condition failed)."""

    ok: bool
    state: BusyState


@dataclass(frozen=True)
class Unavailable:
    """The table could not be read or written."""

    error: str


Answer = Written | BusyState | HookResult | Unavailable | bool | None


@dataclass(frozen=True)
class Progress:
    """Where one instance's protocol is: the step to run next, and what it has learnt so far."""

    request: Request
    step: Step
    state: BusyState | None = None  # the item as last read (None: unreadable, or not read yet)
    decision: Decision | None = None  # the decision being carried out
    since: float | None = None  # the start of the wait
    rounds: int = 0  # claims refused because a writer touched the item
    heartbeat_sent: bool = False
    end: End | None = None  # how it ends once the last bookkeeping step is done
    detail: str = ""

    @property
    def done(self) -> bool:
        return isinstance(self.step, Done)


# --- one instance ---------------------------------------------------------------------------------
def first_step(request: Request, policy: Policy) -> Progress:
    start = Progress(request, Heartbeat(), since=_trusted_start(request, policy))
    seen = request.seen
    if request.recorded is not None:
        return _recheck(start, request.recorded, seen or BusyState(request.instance_id), policy)
    if request.probe:
        return start
    if seen is not None and seen.draining is not None:
        return _decided(start, seen, policy)
    if seen is not None and seen.released is None and _busy(seen, policy):
        # The tick's consistent read shows live work, so release-if-idle would only be refused.
        return replace(start, step=MarkDraining(_draining(start, policy)))
    return replace(start, step=_release_if_idle(request, policy))


def next_step(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    """The step after ``progress.step``, given what running it answered."""
    step = progress.step
    if isinstance(answer, Unavailable):
        return _unavailable(progress, answer.error, policy)
    handler = _AFTER[type(step)]
    return handler(progress, answer, policy)


def _after_release_if_idle(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    assert isinstance(answer, Written)
    state = answer.state
    if answer.ok:
        since = state.draining.since if state.draining is not None else (progress.since or policy.now)
        return _complete(progress, Decision(Action.CONTINUE, Reason.IDLE), since, state)
    released = state.released
    if state.is_released and released is not None and released.at >= progress.request.not_before:
        # The reason is read from the item: bounded, like everything logged from it.
        detail = f"released at {released.at:.0f} ({released.reason[:64]})"
        return _done(progress, End.ALREADY_DONE, policy, detail=detail)
    if state.draining is None:
        return replace(progress, step=MarkDraining(_draining(progress, policy)), state=state)
    return _decided(progress, state, policy)


def _after_mark_draining(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    assert isinstance(answer, BusyState)
    return _decided(progress, answer, policy)


def _after_claim(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    assert isinstance(answer, Written) and progress.decision is not None and progress.state is not None
    if answer.ok:
        return _complete(progress, progress.decision, progress.since or policy.now, progress.state)
    current = answer.state
    decided_on = progress.state.draining
    if current.draining is None or decided_on is None or current.draining.since != decided_on.since:
        return _done(
            progress, End.ALREADY_DONE, policy, progress.decision, detail="released by another trigger"
        )
    progress = replace(progress, rounds=progress.rounds + 1)
    if progress.rounds >= settings.MAX_CLAIM_ROUNDS:
        # Writers keep touching the item: hold on, and decide again at the next trigger.
        return _wait(progress, decide(current, policy.decision, policy.now), current, policy)
    return _decided(progress, current, policy)


def _after_heartbeat(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    assert isinstance(answer, HookResult)
    request, state = progress.request, progress.state
    if answer is HookResult.DONE and request.probe and not progress.heartbeat_sent:
        # Ours after all: adopt it like any other wait, with its heartbeat already sent.
        adopted = replace(request, probe=False)
        return replace(progress, request=adopted, step=_release_if_idle(adopted, policy), heartbeat_sent=True)
    if answer is not HookResult.DONE and request.probe:
        return _done(progress, End.SKIPPED, policy, detail="waiting on another hook, not ours")
    if answer is not HookResult.DONE:
        if state is None:  # the table is unreadable: nothing to record now
            return _done(progress, End.HEARTBEAT, policy, progress.decision, detail=progress.detail)
        gone = RecordGone(_released(policy, GONE), policy.now + policy.released_ttl, _since_of(state))
        why = "no lifecycle action of ours is pending"
        if answer is HookResult.GONE:
            why = "the group or our hook no longer exists"
        return replace(progress, step=gone, end=End.RELEASED_GONE, decision=None, detail=why)
    if state is not None and state.draining is not None and _since_of(state) is not None:
        record = RecordHeartbeat(draining_since=state.draining.since, at=policy.now)
        return replace(progress, step=record, heartbeat_sent=True)
    return _done(progress, End.HEARTBEAT, policy, progress.decision, detail=progress.detail)


def _after_record_heartbeat(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    return _done(progress, End.HEARTBEAT, policy, progress.decision)


def _after_complete(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    assert isinstance(answer, HookResult)
    end = End.COMPLETED if answer is HookResult.DONE else End.ALREADY_DONE
    recorded = progress.request.recorded
    if recorded is not None:
        return replace(progress, step=Confirm(recorded.at), end=end)
    detail = "" if end is End.COMPLETED else "no lifecycle action of ours was pending"
    return _done(progress, end, policy, progress.decision, detail=detail)


def _after_record_gone(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    return replace(progress, step=Done(End.RELEASED_GONE, detail=progress.detail))


def _after_recheck(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    assert isinstance(answer, Written) and progress.decision is not None
    recorded = progress.request.recorded
    assert recorded is not None
    if answer.ok:
        return replace(progress, step=Complete(progress.decision.action))
    current = answer.state
    if current.released is None or current.released.at != recorded.at or current.draining is not None:
        return _done(progress, End.ALREADY_DONE, policy, detail="the recorded release moved on")
    # The item does not prove the recorded release (a live lease beside a release mark): look at
    # it again as a wait of its own, from the time of that release.
    adopted = replace(progress.request, recorded=None, seen=None)
    draining = Draining(since=recorded.at, asg=adopted.asg, hook=policy.hook_name)
    return replace(progress, request=adopted, step=MarkDraining(draining), since=recorded.at, state=current)


def _after_confirm(progress: Progress, answer: Answer, policy: Policy) -> Progress:
    return _done(progress, progress.end or End.COMPLETED, policy, progress.decision)


_AFTER = {
    ReleaseIfIdle: _after_release_if_idle,
    MarkDraining: _after_mark_draining,
    Claim: _after_claim,
    Heartbeat: _after_heartbeat,
    RecordHeartbeat: _after_record_heartbeat,
    Complete: _after_complete,
    RecordGone: _after_record_gone,
    Recheck: _after_recheck,
    Confirm: _after_confirm,
}


# --- the shared moves -----------------------------------------------------------------------------
def _decided(progress: Progress, state: BusyState, policy: Policy) -> Progress:
    """Decide on ``state`` (which has ``draining``) and take the step the decision asks for."""
    since = _since_of(state)
    progress = replace(progress, state=state, since=since if since is not None else progress.since)
    decision = decide(state, policy.decision, policy.now)
    if not decision.completes:
        return _wait(progress, decision, state, policy)
    proof = _proof(decision, state, policy)
    if proof is None and decision.reason is not Reason.MAX_WAIT_EXCEEDED:
        held = Decision(Action.WAIT, Reason.BUSY, f"too many leases to prove {decision.reason}")
        return _wait(progress, held, state, policy)
    claim = Claim(
        released=_released(policy, decision.reason),
        ttl=policy.now + policy.released_ttl,
        draining_since=since,
        proof=proof,
    )
    return replace(progress, step=claim, decision=decision)


def _proof(decision: Decision, state: BusyState, policy: Policy) -> Proof | None:
    """What the release's condition proves: the decision, on the item itself. An item with a
    companion proves each item by its own decision (one may be idle, the other stale)."""
    if state.legacy is None:
        return _item_proof(decision, state)
    own = replace(state, legacy=None)
    companion = companion_of(state)
    own_proof = _item_proof(decide(own, policy.decision, policy.now), own)
    companion_proof = _item_proof(decide(companion, policy.decision, policy.now), companion)
    if own_proof is None or companion_proof is None:
        return None
    return replace(own_proof, legacy=companion_proof)


def _item_proof(decision: Decision, state: BusyState) -> Proof | None:
    if decision.reason is Reason.IDLE:
        return Proof(idle=True)
    if decision.reason is Reason.STALE and schema.provable(state):
        return Proof(unchanged=state)
    return None


def _wait(progress: Progress, decision: Decision, state: BusyState, policy: Policy) -> Progress:
    progress = replace(progress, decision=decision, state=state)
    if progress.heartbeat_sent and state.draining is not None and _since_of(state) is not None:
        return replace(progress, step=RecordHeartbeat(draining_since=state.draining.since, at=policy.now))
    if _heartbeat_due(progress, state, policy):
        return replace(progress, step=Heartbeat())
    return _done(progress, End.WAITING, policy, decision)


def _heartbeat_due(progress: Progress, state: BusyState, policy: Policy) -> bool:
    """Due once ``heartbeat_every`` has passed since the last heartbeat we know of: our recorded
    one, or the start of the wait the event reported (the hook's timer started then). A time in
    the future is nobody's heartbeat (a clock or an item gone wrong): then one is due."""
    known = [progress.request.wait_started]
    if state.draining is not None:
        known.append(state.draining.heartbeat_at)
    times = [t for t in known if t is not None and t <= policy.now]
    return not times or policy.now - max(times) >= policy.heartbeat_every


def _complete(progress: Progress, decision: Decision, since: float, state: BusyState) -> Progress:
    result = Action.ABANDON if decision.action is Action.ABANDON else Action.CONTINUE
    return replace(progress, step=Complete(result), decision=decision, since=since, state=state)


def _unavailable(progress: Progress, error: str, policy: Policy) -> Progress:
    """The table failed: never CONTINUE on an unreadable table, unless max_wait is over."""
    step = progress.step
    empty = BusyState(progress.request.instance_id)
    if isinstance(step, (RecordHeartbeat, Confirm, RecordGone)):
        # Bookkeeping after the hook call: the next tick heartbeats, confirms or records again.
        end = End.RELEASED_GONE if isinstance(step, RecordGone) else (progress.end or End.HEARTBEAT)
        return _done(progress, end, policy, progress.decision, detail=error)
    if isinstance(step, Recheck):
        return _done(progress, End.SKIPPED, policy, detail=f"could not prove the recorded release: {error}")
    decision = progress.decision
    if isinstance(step, Claim) and decision is not None and decision.reason is Reason.MAX_WAIT_EXCEEDED:
        # The wait is over whatever the table says; recording it can wait.
        return _complete(progress, decision, progress.since or policy.now, progress.state or empty)
    unreadable = StateUnavailable(progress.request.instance_id, progress.since, error)
    decision = decide(unreadable, policy.decision, policy.now)
    progress = replace(progress, state=None, decision=decision, detail=error)
    if decision.completes:
        return _complete(progress, decision, progress.since or policy.now, empty)
    return replace(progress, step=Heartbeat())


def _recheck(progress: Progress, recorded: Released, seen: BusyState, policy: Policy) -> Progress:
    """A recorded release is completed again only once the item proves, again, that no live work
    is there: the same proof a release needs, on the item as it is now."""
    decision = _recorded_decision(recorded, policy.decision)
    progress = replace(progress, decision=decision, state=seen)
    if decision.reason is Reason.MAX_WAIT_EXCEEDED:
        return replace(progress, step=Complete(decision.action))
    now = decide(seen, policy.decision, policy.now)
    proof = _proof(now, seen, policy)
    if proof is None:  # live work beside a release mark (or more leases than a proof holds)
        return replace(progress, step=Recheck(recorded.at, Proof(idle=True)))
    return replace(progress, step=Recheck(recorded.at, proof))


def _recorded_decision(released: Released, config: DecisionConfig) -> Decision:
    """The decision a recorded release stands for, to repeat its completion."""
    reason = Reason(released.reason) if released.reason in {r.value for r in Reason} else Reason.IDLE
    action = config.max_wait_result if reason is Reason.MAX_WAIT_EXCEEDED else Action.CONTINUE
    return Decision(action, reason, "completing a recorded release again")


def _release_if_idle(request: Request, policy: Policy) -> ReleaseIfIdle:
    return ReleaseIfIdle(
        released=_released(policy, Reason.IDLE),
        ttl=policy.now + policy.released_ttl,
        not_before=request.not_before,
    )


def _draining(progress: Progress, policy: Policy) -> Draining:
    since = progress.since if progress.since is not None else policy.now
    return Draining(since=since, asg=progress.request.asg, hook=policy.hook_name)


def _trusted_start(request: Request, policy: Policy) -> float | None:
    """The event's time as the start of the wait, within what a real event's delivery allows."""
    started = request.wait_started
    if started is None:
        return None
    return min(max(started, policy.now - settings.LIFECYCLE_EVENT_MAX_DELAY_SECONDS), policy.now)


def _busy(state: BusyState, policy: Policy) -> bool:
    return decide(state, policy.decision, policy.now).reason is Reason.BUSY


def _since_of(state: BusyState | None) -> float | None:
    # An unreadable mark parses as since=0: the start of the wait is unknown, not the epoch.
    if state is None or state.draining is None or state.draining.since <= 0:
        return None
    return state.draining.since


def _released(policy: Policy, reason: str) -> Released:
    return Released(at=policy.now, reason=str(reason), by=policy.actor)


def _done(
    progress: Progress, end: End, policy: Policy, decision: Decision | None = None, *, detail: str = ""
) -> Progress:
    waited = policy.now - progress.since if progress.since is not None else None
    problems = progress.state.problems if progress.state is not None else ()
    return replace(progress, step=Done(end, decision, waited, detail, problems))


# --- the schedule tick ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TickPolicy:
    asg_names: tuple[str, ...]
    hook_name: str
    heartbeat_timeout: float  # past this without our heartbeat, AWS applied the DefaultResult
    max_work: int


@dataclass(frozen=True)
class Skipped:
    request: Request
    detail: str


@dataclass(frozen=True)
class TickPlan:
    work: list[Request] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # (instance id, release time): release marks of instances back in service, to clear.
    clear: list[tuple[str, float]] = field(default_factory=list)
    capped: int = 0  # work left for the next tick
    rejected: int = 0  # items the scan returned that are not a guarded instance's


def ours(items: Mapping[str, BusyState], policy: TickPolicy) -> tuple[dict[str, BusyState], int]:
    """The scanned items the guard may act on, and how many had no valid EC2 instance id (junk or
    forged: never a key to write or an id to send to Auto Scaling). Draining marks must be of our
    own groups and hook: another guard may share the table, and only it may let go."""
    kept: dict[str, BusyState] = {}
    invalid = 0
    for instance_id, state in items.items():
        if not re.fullmatch(INSTANCE_ID_PATTERN, instance_id):
            invalid += 1
            continue
        draining = state.draining
        if draining is not None and (
            draining.asg not in policy.asg_names or draining.hook not in ("", policy.hook_name)
        ):
            continue
        kept[instance_id] = state
    return kept, invalid


def plan_reads(
    listing: Mapping[str, GroupInstance], items: Mapping[str, BusyState] | None, policy: TickPolicy
) -> list[str]:
    """The waiting instances whose items the scan did not return: read them in one batch."""
    if items is None:
        return []
    return [i for i, w in listing.items() if w.waiting and i not in items]


# The order work is done in, and cut at the cap: real waits first (oldest first), then recorded
# releases to repeat, then warm-pool waits to probe, then marks Auto Scaling no longer lists.
_LISTED, _RECORDED, _PROBE, _UNLISTED = range(4)


def plan_tick(
    listing: Mapping[str, GroupInstance],
    items: Mapping[str, BusyState] | None,
    others: Mapping[str, BusyState],
    policy: TickPolicy,
    now: float,
) -> TickPlan:
    """What one tick does, from Auto Scaling's listing (empty when it failed), the scanned items
    (None when the scan failed) and the batch-read items of waiting instances the scan missed."""
    marked, rejected = ours(items or {}, policy)
    ranked: list[tuple[int, float, Request]] = []
    skipped: list[Skipped] = []
    for instance_id, instance in listing.items():
        if not instance.waiting:
            continue
        seen = marked.get(instance_id) or others.get(instance_id)
        request = Request(instance_id, instance.asg, "schedule", seen=seen)
        released = seen.released if seen is not None and seen.is_released else None
        if released is not None:
            if _repeat(released, policy, now):
                ranked.append((_RECORDED, released.at, replace(request, recorded=released)))
            elif now - released.at < settings.RECORDED_RELEASE_RETRY_AFTER_SECONDS:
                skipped.append(Skipped(request, "being released by another invocation"))
            else:
                ranked.append((_PROBE, now, _behind_release(request, released)))
        elif seen is not None and seen.draining is not None:
            ranked.append((_LISTED, seen.draining.since, request))
        elif instance.adoptable:
            ranked.append((_LISTED, now, request))
        else:
            ranked.append((_PROBE, now, replace(request, probe=True)))
    for instance_id, state in marked.items():
        if state.draining is None or (instance_id in listing and listing[instance_id].waiting):
            continue
        # Not in the listing: gone, or marked by an event after we listed. Looked at like any
        # other: Auto Scaling's "no active action" is the only proof that the wait is over.
        ranked.append(
            (
                _UNLISTED,
                state.draining.since,
                Request(instance_id, state.draining.asg, "schedule", seen=state),
            )
        )
    ranked.sort(key=lambda entry: entry[:2])
    work = [request for _rank, _since, request in ranked]
    return TickPlan(
        work=work[: policy.max_work],
        skipped=skipped,
        clear=_releases_to_clear(listing, marked, now),
        capped=max(0, len(work) - policy.max_work),
        rejected=rejected,
    )


def _behind_release(request: Request, released: Released) -> Request:
    """A wait behind a release mark that is not repeated: another hook's wait after ours finished,
    or a newer termination of ours whose event was lost (a warm-pool instance back in service and
    terminating again before a tick saw it InService, which clears the mark). The mark alone can't
    tell them apart, and skipping a wait of ours lets the hook time out. So probe our hook: the
    guard never heartbeats after a release, so past one HeartbeatTimeout (or once confirmed or
    gone) an accepted heartbeat is a newer wait's, and ``not_before`` keeps the old mark from
    counting as that wait's release. "No active action" is another hook's wait: nothing recorded."""
    return replace(request, probe=True, not_before=math.nextafter(released.at, math.inf))


def _repeat(released: Released, policy: TickPolicy, now: float) -> bool:
    """Whether to complete a recorded release again: it may not have been completed (a crash
    between recording and completing) and AWS may still be waiting for it."""
    age = now - released.at
    unfinished = released.reason != GONE and released.confirmed_at is None
    # Past one HeartbeatTimeout without our heartbeat, AWS has applied the hook's DefaultResult.
    return unfinished and settings.RECORDED_RELEASE_RETRY_AFTER_SECONDS <= age < policy.heartbeat_timeout


def _releases_to_clear(
    listing: Mapping[str, GroupInstance], marked: Mapping[str, BusyState], listed_at: float
) -> list[tuple[str, float]]:
    """An instance InService in our listing is not terminating: a release mark older than the
    listing is a finished termination (a warm-pool instance back without a reboot) or a late
    event's, and must not keep its writers refusing work."""
    clear = []
    for instance_id, state in marked.items():
        instance = listing.get(instance_id)
        released = state.released
        if instance is None or instance.lifecycle_state != IN_SERVICE:
            continue
        if released is None or state.draining is not None or released.at >= listed_at:
            continue
        clear.append((instance_id, released.at))
    return clear
