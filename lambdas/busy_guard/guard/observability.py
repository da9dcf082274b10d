"""The one place that owns the Powertools Logger, Metrics and Tracer."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics, Tracer

SERVICE = "busy-guard"
NAMESPACE = "BusyGuard"

logger = Logger(service=SERVICE)
metrics = Metrics(service=SERVICE, namespace=NAMESPACE)
tracer = Tracer(service=SERVICE)


class MetricName:
    COMPLETED = "LifecycleActionsCompleted"
    HOOK_WAIT_SECONDS = "HookWaitSeconds"
    HEARTBEATS = "Heartbeats"
    INSTANCES_WAITING = "InstancesWaiting"  # per tick: how many instances our hook still holds
    STALE_MARKERS = "StaleMarkers"
    STATE_READ_ERRORS = "StateReadErrors"
    MAX_WAIT_EXCEEDED = "MaxWaitExceeded"
    RECONCILE_ERRORS = "ReconcileErrors"
    IGNORED_EVENTS = "IgnoredEvents"
    MALFORMED_EVENTS = "MalformedEvents"
    OBSERVED = "ObserveOnlyDecisions"  # observe-only: completed at once; dimension "would"
    EVENTS_FAILED = "EventsNotPut"
    TICK_WORK_CAPPED = "TickWorkCapped"
    REJECTED_ITEMS = "RejectedItems"
    DEFERRED = "DeferredReconciles"
    HOOK_MISMATCH = "HookConfigMismatch"
