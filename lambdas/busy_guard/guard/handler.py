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

from busy_guard import schema
from busy_guard.decision import Reason
from busy_guard.guard.autoscaling import LifecycleHooks
from busy_guard.guard.config import GuardConfig
from busy_guard.guard.models import (
    Ignored,
    Malformed,
    StreamBatch,
    Termination,
    Tick,
    classify,
    parse_stream_record,
)
from busy_guard.guard.observability import NAMESPACE, SERVICE, MetricName, logger, metrics, tracer
from busy_guard.guard.reconcile import Guard, Outcome, Step, Target, Trigger
from busy_guard.guard.table import BusyTable
from busy_guard.settings import INSTANCE_ID_PATTERN, MAX_LOGGED_CHARS

# Short connect/read timeouts: a hung endpoint must cost a retry, not the whole invocation.
_AWS_CONFIG = Config(
    connect_timeout=3, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 3}
)


# Characters of a stream record's id or of a string from its image that a log line shows.
MAX_SHOWN = MAX_LOGGED_CHARS


class ReconcileError(RuntimeError):
    """Some instances could not be reconciled; the next trigger tries again."""


_guard: Guard | None = None


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
        table=BusyTable(session.client("dynamodb", config=aws), config.table_name),
        hooks=LifecycleHooks(session.client("autoscaling", config=aws), config.hook_name),
        config=config,
        clock=clock,
    )


def use_guard(guard: Guard | None) -> None:
    """Install the guard the handler uses (the sandbox and tests); None goes back to the default."""
    global _guard  # noqa: PLW0603 - one guard per Lambda container, reused across invocations
    _guard = guard


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    if _guard is None:
        # Configuration is validated once per container; clients are reused across invocations.
        use_guard(build_guard())
    assert _guard is not None
    return route(event, _guard)


def route(event: Any, guard: Guard) -> dict[str, Any]:
    invocation = classify(event)
    match invocation:
        case Termination():
            return _on_termination(invocation, guard)
        case Tick():
            report = guard.tick()
            _record(report.outcomes)
            # A gauge, 0 included, so the dashboard shows "nobody held" rather than a gap.
            held = sum(1 for outcome in report.outcomes if outcome.step in (Step.HEARTBEAT, Step.WAITING))
            metrics.add_metric(name=MetricName.INSTANCES_WAITING, unit=MetricUnit.Count, value=held)
            if report.errors:
                raise ReconcileError(f"{len(report.errors)} problem(s) in the tick: {report.errors[0]}")
            return _summary(report.outcomes)
        case StreamBatch():
            return _on_stream(invocation.records, guard)
        case Ignored():
            logger.info(f"ignored: {invocation.reason}")
            metrics.add_metric(name=MetricName.IGNORED_EVENTS, unit=MetricUnit.Count, value=1)
            return {"ignored": invocation.reason}
        case Malformed():
            logger.error(f"malformed event: {invocation.reason}")
            metrics.add_metric(name=MetricName.MALFORMED_EVENTS, unit=MetricUnit.Count, value=1)
            return {"malformed": invocation.reason}


def _on_termination(invocation: Termination, guard: Guard) -> dict[str, Any]:
    detail = invocation.detail
    config = guard.config
    if config.account_id is not None and invocation.event.account != config.account_id:
        # The rule matches only the stack's account; this is the second lock on the same door.
        reason = f"not ours: account {invocation.event.account[:MAX_SHOWN]!r}"
        logger.warning(f"ignored: {reason}")
        return {"ignored": reason}
    if detail.AutoScalingGroupName not in config.asg_names or detail.LifecycleHookName != config.hook_name:
        reason = f"not ours: group {detail.AutoScalingGroupName!r}, hook {detail.LifecycleHookName!r}"
        logger.info(f"ignored: {reason}")
        return {"ignored": reason}
    target = Target(
        instance_id=detail.EC2InstanceId,
        asg=detail.AutoScalingGroupName,
        trigger=Trigger.EVENT,
        not_before=invocation.event.time.timestamp(),
    )
    outcome = guard.reconcile(target)
    _record([outcome])
    return _summary([outcome])


def _on_stream(records: list[Any], guard: Guard) -> dict[str, Any]:
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
        target = Target(state.instance_id, state.draining.asg, Trigger.STREAM, known=state)
        try:
            outcomes.append(guard.reconcile(target))
        except Exception:
            logger.exception(f"stream record {shown}: reconcile failed; the batch will retry it")
            failures.append({"itemIdentifier": record_id})
    _record(outcomes)
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
        if outcome.step is Step.HEARTBEAT:
            metrics.add_metric(name=MetricName.HEARTBEATS, unit=MetricUnit.Count, value=1)
        if outcome.step is Step.COMPLETED and decision is not None:
            if decision.reason is Reason.MAX_WAIT_EXCEEDED:
                metrics.add_metric(name=MetricName.MAX_WAIT_EXCEEDED, unit=MetricUnit.Count, value=1)
            if outcome.waited is not None:
                metrics.add_metric(
                    name=MetricName.HOOK_WAIT_SECONDS, unit=MetricUnit.Seconds, value=outcome.waited
                )
            # By reason, in its own EMF blob, so the dimension doesn't spill onto the others.
            with single_metric(
                name=MetricName.COMPLETED,
                unit=MetricUnit.Count,
                value=1,
                namespace=NAMESPACE,
                default_dimensions={"service": SERVICE},
            ) as metric:
                metric.add_dimension(name="reason", value=str(decision.reason))


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    return {
        "outcomes": [
            {
                "instance_id": outcome.target.instance_id,
                "step": str(outcome.step),
                "reason": str(outcome.decision.reason) if outcome.decision else None,
            }
            for outcome in outcomes
        ]
    }
