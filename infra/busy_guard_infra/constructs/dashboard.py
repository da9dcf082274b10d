"""The CloudWatch dashboard an operator opens during a refresh: who is held, for how long, why each
hold ended, and whether the guard itself is healthy."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from busy_guard.guard.observability import NAMESPACE, SERVICE, MetricName

PERIOD = Duration.minutes(1)
WIDTH = 8
"""Three graphs per row (the dashboard grid is 24 wide)."""
COMPLETION_REASONS = ("idle", "stale", "max_wait_exceeded", "released", "gone")


def guard_metric(name: str, *, statistic: str, label: str, **dimensions: str) -> cloudwatch.Metric:
    return cloudwatch.Metric(
        namespace=NAMESPACE,
        metric_name=name,
        dimensions_map={"service": SERVICE, **dimensions},
        period=PERIOD,
        statistic=statistic,
        label=label,
    )


class GuardDashboard(Construct):
    """Instances waiting, hook wait (p50/p90/max), completions by reason, heartbeats, errors,
    dead-letter depth and the stream's iterator age, one minute per point."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        function: lambda_.IFunction,
        queues: Mapping[str, sqs.IQueue],
    ) -> None:
        super().__init__(scope, construct_id)
        waiting = guard_metric(MetricName.INSTANCES_WAITING, statistic="Maximum", label="held by our hook")
        completions = [
            guard_metric(MetricName.COMPLETED, statistic="Sum", label=reason, reason=reason)
            for reason in COMPLETION_REASONS
        ]
        self.dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            default_interval=Duration.hours(6),
            widgets=[
                [
                    cloudwatch.GraphWidget(
                        title="Instances held in Terminating:Wait",
                        left=[waiting],
                        width=WIDTH,
                    ),
                    cloudwatch.GraphWidget(
                        title="Hook wait until release (seconds)",
                        left=[
                            guard_metric(MetricName.HOOK_WAIT_SECONDS, statistic=stat, label=stat)
                            for stat in ("p50", "p90", "Maximum")
                        ],
                        width=WIDTH,
                    ),
                    cloudwatch.GraphWidget(
                        title="Releases by reason",
                        left=completions,
                        stacked=True,
                        width=WIDTH,
                    ),
                ],
                [
                    cloudwatch.GraphWidget(
                        title="Heartbeats, max-wait releases, stale markers",
                        left=[
                            guard_metric(MetricName.HEARTBEATS, statistic="Sum", label="heartbeats"),
                            guard_metric(MetricName.MAX_WAIT_EXCEEDED, statistic="Sum", label="max wait"),
                            guard_metric(MetricName.STALE_MARKERS, statistic="Sum", label="stale markers"),
                        ],
                        width=WIDTH,
                    ),
                    cloudwatch.GraphWidget(
                        title="Errors",
                        left=[
                            function.metric_errors(period=PERIOD, statistic="Sum", label="Lambda errors"),
                            function.metric_throttles(period=PERIOD, statistic="Sum", label="throttles"),
                            guard_metric(
                                MetricName.STATE_READ_ERRORS, statistic="Sum", label="table unreadable"
                            ),
                            guard_metric(
                                MetricName.MALFORMED_EVENTS, statistic="Sum", label="malformed events"
                            ),
                        ],
                        width=WIDTH,
                    ),
                    cloudwatch.GraphWidget(
                        title="Dead-letter queues (messages)",
                        left=[
                            queue.metric_approximate_number_of_messages_visible(
                                period=PERIOD, statistic="Maximum", label=name
                            )
                            for name, queue in queues.items()
                        ],
                        width=WIDTH,
                    ),
                ],
                [
                    cloudwatch.GraphWidget(
                        title="Stream iterator age (ms)",
                        left=[function.metric("IteratorAge", period=PERIOD, statistic="Maximum")],
                        width=WIDTH,
                    ),
                ],
            ],
        )
