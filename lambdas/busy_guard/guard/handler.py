"""Lambda entry point: route the three trigger shapes to ``Guard.reconcile`` / ``Guard.tick``.

Thin on purpose: parsing lives in ``models``, decisions in ``decision``, I/O in the adapters.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import boto3
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config

from busy_guard import schema, settings
from busy_guard.decision import Action, Decision, Reason, StateUnavailable, decide
from busy_guard.guard.autoscaling import LifecycleHooks
from busy_guard.guard.config import GuardConfig
from busy_guard.guard.deadline import NO_DEADLINE, Deadline
from busy_guard.guard.models import (
    Ignored,
    Malformed,
    StreamBatch,
    Termination,
    Tick,
    classify,
    parse_stream_record,
)
from busy_guard.guard.notify import GuardEvents
from busy_guard.guard.observability import NAMESPACE, SERVICE, MetricName, logger, metrics, tracer
from busy_guard.guard.planner import End, Request
from busy_guard.guard.reconcile import Guard, Outcome, TickReport
from busy_guard.guard.table import BusyTable, TableUnavailableError
from busy_guard.settings import INSTANCE_ID_PATTERN, MAX_LOGGED_CHARS

# The one retry layer: botocore's standard mode (retries throttling and 5xx with backoff). Short
# connect/read timeouts: a hung endpoint must cost a retry, not the whole invocation; together they
# bound one call (settings.aws_call_budget_seconds), which the deadline checks before each call.
_AWS_CONFIG = Config(
    connect_timeout=settings.AWS_CONNECT_TIMEOUT_SECONDS,
    read_timeout=settings.AWS_READ_TIMEOUT_SECONDS,
    retries={"mode": "standard", "total_max_attempts": settings.AWS_MAX_ATTEMPTS},
)


# Characters of a stream record's id or of a string from its image that a log line shows.
MAX_SHOWN = MAX_LOGGED_CHARS


class ReconcileError(RuntimeError):
    """Some instances could not be reconciled; the next trigger tries again."""


_guard: Guard | None = None
_events: GuardEvents | None = None
OBSERVED = "observed"  # the step of an observe-only look: decided, logged, completed at once


def build_guard(
    *,
    config: GuardConfig | None = None,
    session: boto3.Session | None = None,
    clock: Callable[[], float] = time.time,
) -> Guard:
    """A guard from the environment's configuration, with its own clients."""
    config = config or GuardConfig.from_env()
    session = session or boto3.Session()
    # One pooled connection per tick worker (botocore's default pool is 10).
    aws = _AWS_CONFIG.merge(Config(max_pool_connections=max(10, config.tick_concurrency)))
    return Guard(
        table=BusyTable(session.client("dynamodb", config=aws), config.table_name, keys=config.keys),
        hooks=LifecycleHooks(session.client("autoscaling", config=aws), config.hook_name),
        config=config,
        clock=clock,
    )


def use_guard(guard: Guard | None) -> None:
    """Install the guard the handler uses (the sandbox and tests); None goes back to the default."""
    global _guard  # noqa: PLW0603 - one guard per Lambda container, reused across invocations
    _guard = guard


def use_events(events: GuardEvents | None) -> None:
    """Install the EventBridge publisher the handler uses; None builds the default on next use."""
    global _events  # noqa: PLW0603 - one client per Lambda container
    _events = events


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    if _guard is None:
        # Configuration is validated once per container; clients are reused across invocations.
        use_guard(build_guard())
    if _events is None:
        use_events(GuardEvents(boto3.client("events", config=_AWS_CONFIG)))
    assert _guard is not None
    deadline = Deadline.of_invocation(context.get_remaining_time_in_millis())
    return route(event, _guard, deadline=deadline, events=_events)


def route(
    event: Any, guard: Guard, *, deadline: Deadline = NO_DEADLINE, events: GuardEvents | None = None
) -> dict[str, Any]:
    """One invocation. ``events`` puts the held/released events (none without it)."""
    invocation = classify(event)
    if guard.config.observe_only and isinstance(invocation, Termination | Tick | StreamBatch):
        return _observe(invocation, guard)
    match invocation:
        case Termination():
            return _on_termination(invocation, guard, deadline, events)
        case Tick():
            report = guard.tick(deadline)
            _record(report.outcomes)
            # A gauge, 0 included, so the dashboard shows "nobody held" rather than a gap.
            held = sum(1 for outcome in report.outcomes if outcome.end in (End.HEARTBEAT, End.WAITING))
            metrics.add_metric(name=MetricName.INSTANCES_WAITING, unit=MetricUnit.Count, value=held)
            _record_tick(report)
            _publish(events, report.outcomes)
            if report.errors:
                raise ReconcileError(f"{len(report.errors)} problem(s) in the tick: {report.errors[0]}")
            return _summary(report.outcomes)
        case StreamBatch():
            return _on_stream(invocation.records, guard, deadline, events)
        case Ignored():
            logger.info(f"ignored: {invocation.reason}")
            metrics.add_metric(name=MetricName.IGNORED_EVENTS, unit=MetricUnit.Count, value=1)
            return {"ignored": invocation.reason}
        case Malformed():
            logger.error(f"malformed event: {invocation.reason}")
            metrics.add_metric(name=MetricName.MALFORMED_EVENTS, unit=MetricUnit.Count, value=1)
            return {"malformed": invocation.reason}


def _not_ours(invocation: Termination, guard: Guard) -> dict[str, Any] | None:
    detail = invocation.detail
    config = guard.config
    if config.account_id is not None and invocation.event.account != config.account_id:
        # The rule matches only the stack's account; this is the second lock on the same door.
        reason = f"not ours: account {invocation.event.account[:MAX_SHOWN]!r}"
        logger.warning(f"ignored: {reason}")
        return {"ignored": reason}
    if detail.AutoScalingGroupName in config.asg_names and detail.LifecycleHookName == config.hook_name:
        return None
    reason = f"not ours: group {detail.AutoScalingGroupName!r}, hook {detail.LifecycleHookName!r}"
    logger.info(f"ignored: {reason}")
    return {"ignored": reason}


def _on_termination(
    invocation: Termination, guard: Guard, deadline: Deadline, events: GuardEvents | None
) -> dict[str, Any]:
    ignored = _not_ours(invocation, guard)
    if ignored is not None:
        return ignored
    detail = invocation.detail
    # The event's time is when Terminating:Wait started: the start of max_wait and of the hook's timer.
    started = invocation.event.time.timestamp()
    request = Request(
        instance_id=detail.EC2InstanceId,
        asg=detail.AutoScalingGroupName,
        source="event",
        wait_started=started,
        not_before=started,
    )
    outcome = guard.reconcile(request, deadline)
    _record([outcome])
    _publish(events, [outcome])
    return _summary([outcome])


def _on_stream(
    records: list[Any], guard: Guard, deadline: Deadline, events: GuardEvents | None
) -> dict[str, Any]:
    """Reconcile every draining item in the batch; report only the records that failed, so the
    event source retries (and bisects) those and no valid record is lost."""
    failures: list[dict[str, str]] = []
    outcomes: list[Outcome] = []
    config = guard.config
    for position, raw in enumerate(records):
        record_id = _sequence_number(raw) or str(position)
        shown = record_id if len(record_id) <= MAX_SHOWN else record_id[: MAX_SHOWN - 3] + "..."
        try:
            record = parse_stream_record(raw)
            image = record.dynamodb.NewImage
            state = schema.parse_item(image) if image else None
            if state is not None and not re.fullmatch(INSTANCE_ID_PATTERN, state.instance_id):
                # Never a key to write or an id to send to Auto Scaling, nor a whole line of log.
                raise ValueError(f"instance id {state.instance_id[:MAX_SHOWN]!r} is not an EC2 instance id")
            if state is not None and guard.table.keys.owner(state.key) is None:
                # A bare-id item under the isolated scheme, or another account's ARN: the guard
                # marks only items of its own scheme, so this is no wait of ours.
                logger.info(f"stream record {shown}: not an item of this key scheme")
                continue
        except (ValueError, schema.SchemaError) as error:
            logger.error(f"malformed stream record {shown}: {error}")
            metrics.add_metric(name=MetricName.MALFORMED_EVENTS, unit=MetricUnit.Count, value=1)
            continue  # retrying can't repair it
        if state is None or state.draining is None or state.draining.asg not in config.asg_names:
            logger.info(f"stream record {shown}: not a draining item of a guarded group")
            continue
        if state.draining.hook not in ("", config.hook_name):
            hook = state.draining.hook[:MAX_SHOWN]
            logger.info(f"stream record {shown}: draining for another hook ({hook!r})")
            continue
        # The image only says where to look: the release's condition proves it on the item.
        request = Request(state.instance_id, state.draining.asg, "stream", seen=state)
        try:
            outcome = guard.reconcile(request, deadline)
            outcomes.append(outcome)
            if outcome.end is End.DEFERRED:
                failures.append({"itemIdentifier": record_id})
        except Exception:
            logger.exception(f"stream record {shown}: reconcile failed; the batch will retry it")
            failures.append({"itemIdentifier": record_id})
    _record(outcomes)
    _publish(events, outcomes)
    return {"batchItemFailures": failures, **_summary(outcomes)}


def _sequence_number(raw: Any) -> str | None:
    """The identifier Lambda wants back in ``batchItemFailures`` for a DynamoDB stream record."""
    change = raw.get("dynamodb") if isinstance(raw, dict) else None
    number = change.get("SequenceNumber") if isinstance(change, dict) else None
    return number if isinstance(number, str) else None


def _record(outcomes: Iterable[Outcome]) -> None:
    """Metrics are added here, in the invoking thread, never from the tick's worker threads."""
    for outcome in outcomes:
        decision = outcome.decision
        if decision is not None and decision.stale_markers:
            metrics.add_metric(
                name=MetricName.STALE_MARKERS, unit=MetricUnit.Count, value=decision.stale_markers
            )
        if decision is not None and decision.reason is Reason.STATE_UNAVAILABLE:
            metrics.add_metric(name=MetricName.STATE_READ_ERRORS, unit=MetricUnit.Count, value=1)
        if outcome.end is End.HEARTBEAT:
            metrics.add_metric(name=MetricName.HEARTBEATS, unit=MetricUnit.Count, value=1)
        if outcome.end is End.COMPLETED and decision is not None:
            if decision.reason is Reason.MAX_WAIT_EXCEEDED:
                metrics.add_metric(name=MetricName.MAX_WAIT_EXCEEDED, unit=MetricUnit.Count, value=1)
            if outcome.waited is not None:
                metrics.add_metric(
                    name=MetricName.HOOK_WAIT_SECONDS, unit=MetricUnit.Seconds, value=outcome.waited
                )
            _count_by(MetricName.COMPLETED, "reason", str(decision.reason))


def _count_by(name: str, dimension: str, value: str) -> None:
    """One count with its own dimension, in its own EMF blob, so the dimension doesn't spill onto
    the invocation's other metrics."""
    with single_metric(
        name=name,
        unit=MetricUnit.Count,
        value=1,
        namespace=NAMESPACE,
        default_dimensions={"service": SERVICE},
    ) as metric:
        metric.add_dimension(name=dimension, value=value)


def _publish(events: GuardEvents | None, outcomes: list[Outcome]) -> None:
    """The held/released events, after the decisions are made and recorded: never in their way."""
    if events is not None and outcomes:
        events.publish(outcomes)


# --- observe-only: decide and log, never hold ---------------------------------------------------
def _observe(invocation: Termination | Tick | StreamBatch, guard: Guard) -> dict[str, Any]:
    """What the guard would do, logged and counted; every termination of ours completes at once.

    At this level, not inside reconcile, so the mode holds whatever the planner becomes: it reads
    with the table adapter (never writes: a trial on a live fleet leaves its items as they were),
    decides with ``decide()``, and completes with CONTINUE. The tick completes any wait of ours
    still pending (one left by an enforcing guard, or a lost event); stream records hold nothing.
    """
    config = guard.config
    if isinstance(invocation, StreamBatch):
        logger.info(f"observe-only: {len(invocation.records)} stream record(s) ignored")
        return {"batchItemFailures": [], "outcomes": []}
    if isinstance(invocation, Termination):
        ignored = _not_ours(invocation, guard)
        if ignored is not None:
            return ignored
        waiting = {invocation.detail.EC2InstanceId: invocation.detail.AutoScalingGroupName}
    else:
        listed = guard.hooks.waiting_instances(config.asg_names)
        waiting = {iid: instance.asg for iid, instance in listed.items() if instance.adoptable}
    now = time.time()
    try:
        states: dict[str, Any] = guard.table.get_many(waiting)
    except TableUnavailableError as error:
        states = {iid: StateUnavailable(iid, None, str(error)) for iid in waiting}
    outcomes = []
    for instance_id, asg in waiting.items():
        decision = decide(states[instance_id], config.decision, now)
        result = guard.hooks.complete(asg, instance_id, Action.CONTINUE.value)
        _observed(instance_id, asg, decision, str(result))
        outcomes.append(
            {
                "instance_id": instance_id,
                "step": OBSERVED,
                "reason": str(decision.reason),
                "would": str(decision.action),
            }
        )
    return {"observe_only": True, "outcomes": outcomes}


def _observed(instance_id: str, asg: str, decision: Decision, completed: str) -> None:
    would = f"{decision.action} ({decision.reason})"
    logger.info(
        f"{instance_id}: observe-only: would {would}; completed with CONTINUE",
        instance_id=instance_id,
        asg=asg,
        observe_only=True,
        would_action=str(decision.action),
        would_reason=str(decision.reason),
        detail=decision.detail,
        hook_result=completed,
    )
    _count_by(MetricName.OBSERVED, "would", f"{decision.action}_{decision.reason}")


def _record_tick(report: TickReport) -> None:
    if report.capped:
        metrics.add_metric(name=MetricName.TICK_WORK_CAPPED, unit=MetricUnit.Count, value=report.capped)
    if report.rejected:
        metrics.add_metric(name=MetricName.REJECTED_ITEMS, unit=MetricUnit.Count, value=report.rejected)
    deferred = sum(1 for outcome in report.outcomes if outcome.end is End.DEFERRED)
    if deferred:
        metrics.add_metric(name=MetricName.DEFERRED, unit=MetricUnit.Count, value=deferred)
    for mismatch in report.mismatches:
        facts = mismatch.facts
        found = (
            f"HeartbeatTimeout={facts.heartbeat_timeout}, DefaultResult={facts.default_result}"
            if facts is not None
            else "no such hook"
        )
        logger.warning(f"hook of {mismatch.asg} differs from the configuration: {found}", asg=mismatch.asg)
        metrics.add_metric(name=MetricName.HOOK_MISMATCH, unit=MetricUnit.Count, value=1)


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    return {
        "outcomes": [
            {
                "instance_id": outcome.request.instance_id,
                "step": str(outcome.end),
                "reason": str(outcome.decision.reason) if outcome.decision else None,
            }
            for outcome in outcomes
        ]
    }
