"""Events for people: an EventBridge event on the default bus when the guard starts holding an
instance and when it releases one (source ``busy-guard``), for a rule to route to chat or SNS.

Derived from the Outcomes the handler already receives, never from inside a reconcile, so the
decision path knows nothing of them. Best effort: a failing PutEvents is logged and counted and
never changes, delays or fails a decision.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import BotoCoreError, ClientError

from busy_guard.decision import Action
from busy_guard.guard.observability import MetricName, logger, metrics
from busy_guard.guard.planner import End
from busy_guard.guard.reconcile import Outcome
from busy_guard.settings import EVENT_BUS, EVENT_HELD, EVENT_RELEASED, EVENT_SOURCE

PUT_EVENTS_BATCH = 10  # PutEvents takes at most 10 entries a call


@dataclass(frozen=True)
class Notice:
    """One event to put: what happened to which instance."""

    detail_type: str
    instance_id: str
    group: str
    reason: str
    action: str
    waited_seconds: float | None
    trigger: str
    lease_kinds: tuple[str, ...]

    def entry(self) -> dict[str, Any]:
        detail = {
            "instance_id": self.instance_id,
            "group": self.group,
            "reason": self.reason,
            "action": self.action,
            "waited_seconds": round(self.waited_seconds) if self.waited_seconds is not None else None,
            "lease_kinds": list(self.lease_kinds),
            "trigger": self.trigger,
        }
        return {
            "Source": EVENT_SOURCE,
            "DetailType": self.detail_type,
            "Detail": json.dumps(detail),
            "EventBusName": EVENT_BUS,
        }


def notices(outcomes: Iterable[Outcome]) -> list[Notice]:
    """Pure: the held and released events these outcomes stand for."""
    found: list[Notice] = []
    for outcome in outcomes:
        decision = outcome.decision
        if decision is None:
            continue
        # A hold starts in the reconcile that set the draining mark (two triggers racing on one new
        # termination may both see themselves set it: then the event is put twice).
        if outcome.marked and decision.action is Action.WAIT:
            kind = EVENT_HELD
        elif outcome.end is End.COMPLETED:
            kind = EVENT_RELEASED
        else:
            continue
        request = outcome.request
        found.append(
            Notice(
                detail_type=kind,
                instance_id=request.instance_id,
                group=request.asg,
                reason=str(decision.reason),
                action=str(decision.action),
                waited_seconds=outcome.waited,
                trigger=request.source,
                lease_kinds=decision.lease_kinds,
            )
        )
    return found


class GuardEvents:
    """PutEvents on the default bus."""

    def __init__(self, client: Any) -> None:  # an "events" client (no type stubs installed for it)
        self.client = client

    def publish(self, outcomes: Iterable[Outcome]) -> int:
        """Put the events; the number put. Never raises, and makes no other call: the lease kinds
        come from the decisions, so an event costs no read of the table."""
        try:
            entries = [notice.entry() for notice in notices(outcomes)]
        except Exception:  # a bug here must not fail the invocation that made the decisions
            logger.exception("could not build the busy-guard events")
            metrics.add_metric(name=MetricName.EVENTS_FAILED, unit=MetricUnit.Count, value=1)
            return 0
        put = 0
        for start in range(0, len(entries), PUT_EVENTS_BATCH):
            batch = entries[start : start + PUT_EVENTS_BATCH]
            try:
                response = self.client.put_events(Entries=batch)
                failed = int(response.get("FailedEntryCount", 0))
                errors = {e.get("ErrorCode") for e in response.get("Entries", []) if e.get("ErrorCode")}
            except (ClientError, BotoCoreError) as error:
                failed, errors = len(batch), {f"{type(error).__name__}: {error}"[:300]}
            if failed:
                logger.warning(f"PutEvents failed for {failed} event(s): {sorted(map(str, errors))}")
                metrics.add_metric(name=MetricName.EVENTS_FAILED, unit=MetricUnit.Count, value=failed)
            put += len(batch) - failed
        return put
