"""``reconcile(target)``: the one code path every trigger takes, and the schedule tick around it.

Level-triggered: everything needed is read from the table and from Auto Scaling on every pass, so
a lost event, a crashed invocation or a throttled call is repaired by the next trigger. Each
release is a conditional write that also claims the wait, so of two concurrent triggers only one
completes the hook.

Calls per decision on the common paths (a first look is one conditional ``UpdateItem``):
    idle, first look       release-if-idle  + CompleteLifecycleAction          = 2
    busy, first look       release-if-idle (fails) + mark draining            = 2
    busy, later tick       RecordLifecycleActionHeartbeat (state from the scan) = 1
    last lease ended       release (state from the stream image) + Complete     = 2
    busy, event lost       mark draining (batch read: busy) + heartbeat         = 2
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from botocore.exceptions import BotoCoreError, ClientError

from busy_guard.decision import Action, Decision, Reason, StateUnavailable, decide
from busy_guard.guard.autoscaling import (
    IN_SERVICE,
    AutoScalingUnavailableError,
    GroupInstance,
    HookResult,
    LifecycleHooks,
)
from busy_guard.guard.config import GuardConfig
from busy_guard.guard.observability import logger
from busy_guard.guard.table import BusyTable, TableUnavailableError
from busy_guard.schema import BusyState, Draining, Released

GONE = "gone"
MAX_CLAIM_ROUNDS = 3
# A release this young is still being completed by the invocation that recorded it.
RETRY_AFTER = 30.0


class Trigger(StrEnum):
    EVENT = "event"
    STREAM = "stream"
    SCHEDULE = "schedule"


class Step(StrEnum):
    """What a reconcile did, for logs, metrics and tests."""

    COMPLETED = "completed"  # we completed the lifecycle action
    ALREADY_DONE = "already_done"  # released or completed before us: nothing to do
    HEARTBEAT = "heartbeat"  # still waiting; the hook's timeout was restarted
    WAITING = "waiting"  # still waiting; the hook's timer just started, no heartbeat needed
    RELEASED_GONE = "released_gone"  # the instance is no longer waiting on our hook
    SKIPPED = "skipped"  # waiting on another hook after we finished


@dataclass(frozen=True)
class Target:
    instance_id: str
    asg: str
    trigger: Trigger
    # A release at or after this time already finished this termination (the event's time).
    not_before: float = 0.0
    # State already read with ``draining`` set (the tick's scan, a stream image); saves a call.
    known: BusyState | None = None


@dataclass(frozen=True)
class Outcome:
    target: Target
    step: Step
    decision: Decision | None = None
    waited: float | None = None
    detail: str = ""
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetryCompletion:
    """Released but still waiting: an invocation may have died, or CompleteLifecycleAction failed,
    between recording the release and completing the hook. Completing again is safe: AWS answers
    "no active action" when it is done (or when the wait is another hook's), and then the release
    is confirmed on the item so later ticks leave the instance alone."""

    target: Target


Work = Target | RetryCompletion


@dataclass
class TickReport:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Guard:
    def __init__(
        self,
        *,
        table: BusyTable,
        hooks: LifecycleHooks,
        config: GuardConfig,
        clock: Callable[[], float] = time.time,
        actor: str = "busy-guard",
    ) -> None:
        self._table = table
        self._hooks = hooks
        self._config = config
        self._clock = clock
        self._actor = actor

    @property
    def config(self) -> GuardConfig:
        return self._config

    @property
    def hooks(self) -> LifecycleHooks:
        return self._hooks

    @property
    def table(self) -> BusyTable:
        return self._table

    # --- one instance -----------------------------------------------------------------------------
    def reconcile(self, target: Target) -> Outcome:
        with _log_keys(target):
            outcome = self._reconcile(target)
            decision = outcome.decision
            logger.info(
                f"{target.instance_id}: {outcome.step}",
                step=str(outcome.step),
                action=str(decision.action) if decision else None,
                reason=str(decision.reason) if decision else None,
                detail=outcome.detail or (decision.detail if decision else ""),
                waited_seconds=round(outcome.waited, 1) if outcome.waited is not None else None,
            )
            for problem in outcome.problems:
                logger.warning(f"unreadable part of the item: {problem}")
            return outcome

    def _reconcile(self, target: Target) -> Outcome:
        now = self._clock()
        state = target.known if target.known is not None and target.known.is_draining else None
        if state is None and self._known_busy(target, now):
            # The tick's consistent batch read shows live work, so release-if-idle would only be
            # refused: take the look at once. Its ALL_NEW state is what gets decided on, so work
            # that ended since the read is still released now.
            try:
                state = self._table.mark_draining(
                    target.instance_id, Draining(since=now, asg=target.asg, hook=self._hooks.hook_name)
                )
            except TableUnavailableError as error:
                return self._unavailable(target, now, str(error), target.not_before or None)
        if state is None:
            try:
                released, state = self._table.release_if_idle(
                    target.instance_id,
                    self._released(now, Reason.IDLE),
                    ttl=now + self._config.released_ttl,
                    not_before=target.not_before,
                )
                if released:
                    since = state.draining.since if state.draining is not None else now
                    return self._complete(target, Decision(Action.CONTINUE, Reason.IDLE), since, now, state)
                if (
                    state.is_released
                    and state.released is not None
                    and state.released.at >= target.not_before
                ):
                    # The reason is read from the item: bounded, like everything logged from it.
                    detail = f"released at {state.released.at:.0f} ({state.released.reason[:64]})"
                    return Outcome(target, Step.ALREADY_DONE, detail=detail)
                if state.draining is None:
                    state = self._table.mark_draining(
                        target.instance_id, Draining(since=now, asg=target.asg, hook=self._hooks.hook_name)
                    )
            except TableUnavailableError as error:
                return self._unavailable(target, now, str(error), target.not_before or None)
        return self._act(target, state, now)

    def _known_busy(self, target: Target, now: float) -> bool:
        known = target.known
        if known is None or known.draining is not None or known.released is not None:
            return False
        return decide(known, self._config.decision, now).reason is Reason.BUSY

    def _act(self, target: Target, state: BusyState, now: float) -> Outcome:
        for _round in range(MAX_CLAIM_ROUNDS):
            assert state.draining is not None
            since = state.draining.since
            decision = decide(state, self._config.decision, now)
            if decision.action is Action.WAIT:
                return self._wait(target, decision, state, now)
            try:
                claimed, current = self._table.release(
                    target.instance_id,
                    self._released(now, decision.reason),
                    ttl=now + self._config.released_ttl,
                    draining_since=since if since > 0 else None,
                    # max_wait ends the wait whatever writers do; any other release needs the
                    # state it was decided on to be the item's state still.
                    unchanged=None if decision.reason is Reason.MAX_WAIT_EXCEEDED else state,
                )
            except TableUnavailableError as error:
                if decision.reason is Reason.MAX_WAIT_EXCEEDED:
                    # The wait is over whatever the table says; recording it can wait.
                    return self._complete(target, decision, since, now, state)
                return self._unavailable(target, now, str(error), since)
            if claimed:
                return self._complete(target, decision, since, now, state)
            if current.draining is None or current.draining.since != since:
                return Outcome(target, Step.ALREADY_DONE, decision, detail="released by another trigger")
            state = current  # a writer touched the item after our read: decide on the fresh state
        return self._wait(target, decide(state, self._config.decision, now), state, now)

    def _wait(self, target: Target, decision: Decision, state: BusyState, now: float) -> Outcome:
        since = state.draining.since if state.draining is not None else None
        waited = now - since if since else None
        if target.trigger is Trigger.EVENT and decision.reason is Reason.BUSY:
            # The hook's HeartbeatTimeout started with this very event; the schedule heartbeats it.
            return Outcome(target, Step.WAITING, decision, waited, problems=state.problems)
        if self._hooks.heartbeat(target.asg, target.instance_id) is HookResult.NOT_ACTIVE:
            return self._release_gone(target, state, now, "no lifecycle action of ours is pending")
        return Outcome(target, Step.HEARTBEAT, decision, waited, problems=state.problems)

    def _complete(
        self, target: Target, decision: Decision, since: float, now: float, state: BusyState
    ) -> Outcome:
        result = Action.ABANDON if decision.action is Action.ABANDON else Action.CONTINUE
        answer = self._hooks.complete(target.asg, target.instance_id, result.value)
        step = Step.COMPLETED if answer is HookResult.DONE else Step.ALREADY_DONE
        detail = "" if step is Step.COMPLETED else "no lifecycle action of ours was pending"
        return Outcome(target, step, decision, now - since, detail=detail, problems=state.problems)

    def _unavailable(self, target: Target, now: float, error: str, since: float | None) -> Outcome:
        decision = decide(StateUnavailable(target.instance_id, since, error), self._config.decision, now)
        logger.warning(f"busy table unavailable: {error}")
        if decision.completes:
            return self._complete(target, decision, since or now, now, BusyState(target.instance_id))
        # Never CONTINUE on an unreadable table: hold the instance and look again next tick.
        self._hooks.heartbeat(target.asg, target.instance_id)
        return Outcome(target, Step.HEARTBEAT, decision, now - since if since else None, detail=error)

    def _release_gone(self, target: Target, state: BusyState, now: float, why: str) -> Outcome:
        since = state.draining.since if state.draining is not None else None
        try:
            self._table.release(
                target.instance_id,
                self._released(now, GONE),
                ttl=now + self._config.released_ttl,
                draining_since=since if since else None,
            )
        except TableUnavailableError as error:
            logger.warning(f"could not record the release of a gone instance: {error}")
        return Outcome(target, Step.RELEASED_GONE, detail=why)

    def _released(self, now: float, reason: str) -> Released:
        return Released(at=now, reason=str(reason), by=self._actor)

    # --- the schedule tick ------------------------------------------------------------------------
    def tick(self) -> TickReport:
        """Look at every instance waiting on our hook and every item we are waiting on."""
        now = self._clock()
        report = TickReport()
        instances: dict[str, GroupInstance] | None = None
        waiting: dict[str, GroupInstance] | None = None
        marked: dict[str, BusyState] = {}
        draining: dict[str, BusyState] | None = None
        try:
            instances = self._hooks.group_instances(self._config.asg_names)
            waiting = {i: w for i, w in instances.items() if w.waiting}
        except (AutoScalingUnavailableError, ClientError, BotoCoreError) as error:
            report.errors.append(f"listing waiting instances failed: {error}")
        try:
            marked = self._table.marked_items()
            draining = {
                instance_id: state
                for instance_id, state in marked.items()
                # Only our groups: another guard may share the table, and only it may let go.
                if state.draining is not None
                and state.draining.asg in self._config.asg_names
                and state.draining.hook in ("", self._hooks.hook_name)
            }
        except TableUnavailableError as error:
            report.errors.append(str(error))
        for message in report.errors:
            logger.error(message)

        self._clear_releases_of_instances_in_service(now, instances or {}, marked)
        # Auto Scaling not listed: nothing to adopt, but every item we hold is still heartbeated.
        targets, finished = self._plan(now, waiting or {}, draining)
        report.outcomes.extend(finished)
        report.outcomes.extend(self._run_all(targets, report))
        return report

    def _clear_releases_of_instances_in_service(
        self, listed_at: float, instances: dict[str, GroupInstance], marked: dict[str, BusyState]
    ) -> None:
        """An instance InService in our listing is not terminating: a release mark older than the
        listing is a finished termination (a warm-pool instance back without a reboot) or a late
        event's, and must not keep its writers refusing work."""
        for instance_id, state in marked.items():
            instance = instances.get(instance_id)
            released = state.released
            if instance is None or instance.lifecycle_state != IN_SERVICE:
                continue
            if released is None or state.draining is not None or released.at >= listed_at:
                continue
            try:
                if self._table.clear_release(instance_id, released.at):
                    logger.info(f"{instance_id}: back in service; its release mark is cleared")
            except TableUnavailableError as error:
                logger.warning(f"{instance_id}: could not clear the release mark: {error}")

    def _plan(
        self, now: float, waiting: dict[str, GroupInstance], draining: dict[str, BusyState] | None
    ) -> tuple[list[Work], list[Outcome]]:
        work: list[Work] = []
        finished: list[Outcome] = []
        known = draining or {}
        # Maybe a launch hook's wait (a new warm-pool instance): only our event may claim those.
        waiting = {i: w for i, w in waiting.items() if i in known or w.adoptable}
        unknown = [instance_id for instance_id in waiting if instance_id not in known]
        others: dict[str, BusyState] = {}
        if unknown and draining is not None:
            try:
                others = self._table.get_many(unknown)
            except TableUnavailableError as error:
                logger.error(str(error))
        # Past one HeartbeatTimeout without our heartbeat, AWS has applied the hook's DefaultResult.
        retry_window = self._config.heartbeat_timeout
        for instance_id, (asg, _state) in waiting.items():
            seen = known.get(instance_id) or others.get(instance_id)
            target = Target(instance_id, asg, Trigger.SCHEDULE, known=seen)
            if seen is not None and seen.is_released and seen.released is not None:
                released = seen.released
                age = now - released.at
                unfinished = released.reason != GONE and released.confirmed_at is None
                if unfinished and RETRY_AFTER <= age < retry_window:
                    work.append(RetryCompletion(target))
                else:
                    finished.append(Outcome(target, Step.SKIPPED, detail="waiting on another hook"))
                continue
            work.append(target)
        for instance_id, state in known.items():
            if instance_id in waiting:
                continue
            # Not in the listing: gone, or marked by an event after we listed. Looked at like any
            # other: Auto Scaling's "no active action" on the heartbeat or the completion is the
            # only proof that the wait is over, and then the mark is recorded as released.
            assert state.draining is not None
            work.append(Target(instance_id, state.draining.asg, Trigger.SCHEDULE, known=state))
        return work, finished

    def _run_one(self, item: Work) -> Outcome:
        if isinstance(item, Target):
            return self.reconcile(item)
        target, now = item.target, self._clock()
        state = target.known or BusyState(target.instance_id)
        with _log_keys(target):
            outcome = self._complete(target, _recorded_decision(state, self._config), now, now, state)
            self._confirm(target, state, now)
            logger.info(
                f"{target.instance_id}: {outcome.step}", step=str(outcome.step), detail=outcome.detail
            )
            return outcome

    def _confirm(self, target: Target, state: BusyState, now: float) -> None:
        if state.released is None:
            return
        try:
            self._table.confirm_release(target.instance_id, state.released.at, now=now)
        except TableUnavailableError as error:
            logger.warning(f"could not confirm the release; the next tick completes again: {error}")

    def _run_all(self, work: list[Work], report: TickReport) -> list[Outcome]:
        if not work:
            return []
        outcomes: list[Outcome] = []
        workers = min(self._config.tick_concurrency, len(work))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile") as pool:
            futures = [(item, pool.submit(self._run_one, item)) for item in work]
            for item, future in futures:
                try:
                    outcomes.append(future.result())
                except Exception as error:  # one instance must never stop the others
                    instance_id = item.instance_id if isinstance(item, Target) else item.target.instance_id
                    message = f"{instance_id}: reconcile failed: {error}"
                    logger.exception(message)
                    report.errors.append(message)
        return outcomes


def _recorded_decision(state: BusyState, config: GuardConfig) -> Decision:
    """The decision a recorded release stands for, to repeat its completion."""
    reason = Reason.IDLE
    if state.released is not None and state.released.reason in {r.value for r in Reason}:
        reason = Reason(state.released.reason)
    action = config.decision.max_wait_result if reason is Reason.MAX_WAIT_EXCEEDED else Action.CONTINUE
    return Decision(action, reason, "completing a recorded release again")


@contextmanager
def _log_keys(target: Target) -> Iterator[None]:
    logger.thread_safe_append_keys(
        instance_id=target.instance_id, asg=target.asg, trigger=str(target.trigger)
    )
    try:
        yield
    finally:
        logger.thread_safe_remove_keys(["instance_id", "asg", "trigger"])
