"""``Guard``: the executor of the planner's steps, for one instance and for the schedule tick.

Level-triggered: everything needed is read from the table and from Auto Scaling on every pass, so
a lost event, a crashed invocation or a throttled call is repaired by the next trigger. What to do
is the planner's (``guard/planner.py``, pure); this module only runs each step through an adapter
and hands the answer back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError

from busy_guard import settings
from busy_guard.decision import Decision
from busy_guard.guard import planner
from busy_guard.guard.autoscaling import AutoScalingUnavailableError, GroupInstance, HookFacts, LifecycleHooks
from busy_guard.guard.config import GuardConfig
from busy_guard.guard.deadline import NO_DEADLINE, Deadline, DeadlineExceededError
from busy_guard.guard.observability import logger
from busy_guard.guard.planner import End, Request
from busy_guard.guard.table import BusyTable, TableUnavailableError
from busy_guard.schema import BusyState


@dataclass(frozen=True)
class Outcome:
    request: Request
    end: End
    decision: Decision | None = None
    waited: float | None = None
    detail: str = ""
    problems: tuple[str, ...] = ()
    # This reconcile set the draining mark: the hold started here (the "held" event's cue).
    marked: bool = False


@dataclass(frozen=True)
class HookMismatch:
    asg: str
    facts: HookFacts | None  # None: the group has no such hook


@dataclass
class TickReport:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    capped: int = 0
    rejected: int = 0
    mismatches: list[HookMismatch] = field(default_factory=list)


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
    def reconcile(self, request: Request, deadline: Deadline = NO_DEADLINE) -> Outcome:
        with _log_keys(request):
            outcome = self._execute(request, deadline)
            decision = outcome.decision
            logger.info(
                f"{request.instance_id}: {outcome.end}",
                step=str(outcome.end),
                action=str(decision.action) if decision else None,
                reason=str(decision.reason) if decision else None,
                detail=outcome.detail or (decision.detail if decision else ""),
                waited_seconds=round(outcome.waited, 1) if outcome.waited is not None else None,
            )
            for problem in outcome.problems:
                logger.warning(f"unreadable part of the item: {problem}")
            return outcome

    def _execute(self, request: Request, deadline: Deadline) -> Outcome:
        policy = self._policy()
        progress = planner.first_step(request, policy)
        marked = False
        while not isinstance(progress.step, planner.Done):
            if not deadline.allows_call():
                return Outcome(request, End.DEFERRED, detail="no time left in this invocation", marked=marked)
            marked = marked or isinstance(progress.step, planner.MarkDraining)
            progress = planner.next_step(progress, self._run(request, progress.step), policy)
        done = progress.step
        return Outcome(request, done.end, done.decision, done.waited, done.detail, done.problems, marked)

    def _run(self, request: Request, step: planner.Step) -> planner.Answer:
        """One step through its adapter. A table failure is an answer; an Auto Scaling failure
        (after the client's retries) raises, and the next trigger tries again."""
        try:
            return self._table_step(request, step)
        except TableUnavailableError as error:
            logger.warning(f"busy table unavailable: {error}")
            return planner.Unavailable(str(error))

    def _table_step(self, request: Request, step: planner.Step) -> planner.Answer:
        table, instance_id, now = self._table, request.instance_id, self._clock()
        match step:
            case planner.Heartbeat():
                return self._hooks.heartbeat(request.asg, instance_id)
            case planner.Complete(result=result):
                return self._hooks.complete(request.asg, instance_id, result.value)
            case planner.ReleaseIfIdle(released=released, ttl=ttl, not_before=not_before):
                return planner.Written(
                    *table.release_if_idle(instance_id, released, ttl=ttl, not_before=not_before)
                )
            case planner.MarkDraining(draining=draining):
                return table.mark_draining(instance_id, draining)
            case planner.Claim(released=released, ttl=ttl, draining_since=since, proof=proof):
                return planner.Written(
                    *table.release(instance_id, released, ttl=ttl, draining_since=since, proof=proof)
                )
            case planner.RecordGone(released=released, ttl=ttl, draining_since=since):
                return planner.Written(*table.release(instance_id, released, ttl=ttl, draining_since=since))
            case planner.RecordHeartbeat(draining_since=since, at=at):
                return table.record_heartbeat(instance_id, draining_since=since, at=at)
            case planner.Recheck(released_at=released_at, proof=proof):
                return planner.Written(*table.recheck_release(instance_id, released_at, now=now, proof=proof))
            case planner.Confirm(released_at=released_at):
                return table.confirm_release(instance_id, released_at, now=now)
        raise AssertionError(f"no adapter for {step!r}")

    def _policy(self, heartbeat_timeout: float | None = None) -> planner.Policy:
        timeout = (
            heartbeat_timeout if heartbeat_timeout is not None else self._heartbeat_timeout(cached_only=True)
        )
        return planner.Policy(
            decision=self._config.decision,
            hook_name=self._hooks.hook_name,
            heartbeat_every=settings.heartbeat_every_seconds(timeout, self._config.reconcile_interval),
            released_ttl=self._config.released_ttl,
            actor=self._actor,
            now=self._clock(),
        )

    def _heartbeat_timeout(self, *, cached_only: bool) -> float:
        """The shortest of the configured and the real hooks' HeartbeatTimeout: heartbeats are due
        by the hook AWS actually has, wherever it differs from the stack's configuration."""
        real = [self._hooks.hook_facts(asg, cached_only=cached_only) for asg in self._config.asg_names]
        return float(min([self._config.heartbeat_timeout, *(f.heartbeat_timeout for f in real if f)]))

    # --- the schedule tick ------------------------------------------------------------------------
    def tick(self, deadline: Deadline = NO_DEADLINE) -> TickReport:
        """Look at every instance waiting on our hook and every item we are waiting on."""
        now = self._clock()
        report = TickReport()
        report.mismatches = self._check_hooks(report.errors)
        listing: dict[str, GroupInstance] = {}
        items: dict[str, BusyState] | None = None
        others: dict[str, BusyState] = {}
        try:
            listing = self._hooks.group_instances(self._config.asg_names, deadline)
        except (AutoScalingUnavailableError, DeadlineExceededError, ClientError, BotoCoreError) as error:
            report.errors.append(f"listing waiting instances failed: {error}")
        tick_policy = planner.TickPolicy(
            asg_names=self._config.asg_names,
            hook_name=self._hooks.hook_name,
            heartbeat_timeout=self._heartbeat_timeout(cached_only=True),
            max_work=settings.MAX_TICK_WORK,
        )
        try:
            items = self._table.marked_items(deadline)
        except (TableUnavailableError, DeadlineExceededError) as error:
            report.errors.append(str(error))
        for message in report.errors:
            logger.error(message)
        try:
            others = self._table.get_many(planner.plan_reads(listing, items, tick_policy), deadline)
        except (TableUnavailableError, DeadlineExceededError) as error:
            # Only a shortcut: without it each unknown instance is looked at with its own write.
            logger.error(str(error))

        plan = planner.plan_tick(listing, items, others, tick_policy, now)
        report.capped, report.rejected = plan.capped, plan.rejected
        if plan.capped:
            logger.warning(
                f"tick capped at {tick_policy.max_work} instances; {plan.capped} left for the next"
            )
        self._clear_releases(plan.clear)
        report.outcomes.extend(Outcome(s.request, End.SKIPPED, detail=s.detail) for s in plan.skipped)
        report.outcomes.extend(self._run_all(plan.work, report, deadline))
        return report

    def _check_hooks(self, errors: list[str]) -> list[HookMismatch]:
        """Read our hooks as AWS has them (once per container) and report where they differ from
        the configuration: a hook edited outside the stack heartbeats by its real timeout."""
        mismatches = []
        for asg in self._config.asg_names:
            try:
                facts = self._hooks.hook_facts(asg)
            except AutoScalingUnavailableError as error:
                errors.append(f"reading the hook of {asg} failed: {error}")
                continue
            configured = (self._config.heartbeat_timeout, self._config.hook_default_result)
            if facts is None or (facts.heartbeat_timeout, facts.default_result) != configured:
                mismatches.append(HookMismatch(asg, facts))
        return mismatches

    def _clear_releases(self, clear: list[tuple[str, float]]) -> None:
        for instance_id, released_at in clear:
            try:
                if self._table.clear_release(instance_id, released_at):
                    logger.info(f"{instance_id}: back in service; its release mark is cleared")
            except TableUnavailableError as error:
                logger.warning(f"{instance_id}: could not clear the release mark: {error}")

    def _run_all(self, work: list[Request], report: TickReport, deadline: Deadline) -> list[Outcome]:
        if not work:
            return []
        outcomes: list[Outcome] = []
        workers = min(self._config.tick_concurrency, len(work))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile") as pool:
            futures = [(request, pool.submit(self.reconcile, request, deadline)) for request in work]
            for request, future in futures:
                try:
                    outcomes.append(future.result())
                except Exception as error:  # one instance must never stop the others
                    message = f"{request.instance_id}: reconcile failed: {error}"
                    logger.exception(message)
                    report.errors.append(message)
        return outcomes


@contextmanager
def _log_keys(request: Request) -> Iterator[None]:
    logger.thread_safe_append_keys(instance_id=request.instance_id, asg=request.asg, trigger=request.source)
    try:
        yield
    finally:
        logger.thread_safe_remove_keys(["instance_id", "asg", "trigger"])
