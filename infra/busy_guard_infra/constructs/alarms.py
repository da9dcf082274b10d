"""The guard's alarms: it is failing, it is losing events, it is falling behind, or work was cut off."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from busy_guard_infra.constants import MAX_WAIT_EXCEEDED_METRIC, METRICS_NAMESPACE, SERVICE_NAME

PERIOD = Duration.minutes(5)
ITERATOR_AGE_THRESHOLD = Duration.minutes(5)
"""The stream path should release within seconds; minutes of lag mean the guard is falling behind (the
one-minute reconcile still releases, so this is a warning about latency, not about correctness)."""


class GuardAlarms(Construct):
    """One alarm per failure mode, each with a description that says what to look at.

    ``alarms`` maps a short name to its alarm, for outputs and tests. All treat missing data as not
    breaching: a quiet guard (no terminations, no stream records) is a healthy one.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        function: lambda_.IFunction,
        queues: Mapping[str, sqs.IQueue],
        alarm_topic: sns.ITopic | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.alarms: dict[str, cloudwatch.Alarm] = {}

        self._add(
            "FunctionErrors",
            function.metric_errors(period=PERIOD, statistic=cloudwatch.Stats.SUM),
            threshold=1,
            description=(
                "The busy-guard Lambda raised errors. The one-minute reconcile retries, but while it fails "
                "busy instances are not heartbeaten and their hooks time out to the DefaultResult. "
                "Check the function's log group."
            ),
        )
        self._add(
            "StreamIteratorAge",
            function.metric("IteratorAge", period=PERIOD, statistic=cloudwatch.Stats.MAXIMUM),
            threshold=ITERATOR_AGE_THRESHOLD.to_milliseconds(),
            description=(
                "The guard is more than 5 minutes behind on the busy table's stream: releases that should "
                "follow the end of work within seconds now wait for the one-minute reconcile."
            ),
        )
        self._add(
            "MaxWaitExceeded",
            cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name=MAX_WAIT_EXCEEDED_METRIC,
                dimensions_map={"service": SERVICE_NAME},
                period=PERIOD,
                statistic=cloudwatch.Stats.SUM,
            ),
            threshold=1,
            description=(
                "An instance was still busy after max_wait and was released anyway: its work was "
                "interrupted. Check which lease held it (busy-guard status) and whether max_wait fits it."
            ),
        )
        for name, queue in queues.items():
            self._add(
                f"{name}Depth",
                queue.metric_approximate_number_of_messages_visible(
                    period=PERIOD, statistic=cloudwatch.Stats.MAXIMUM
                ),
                threshold=1,
                description=(
                    f"Messages in the guard's {name} queue: events or stream records the guard never "
                    "processed. The one-minute reconcile repairs the state; inspect the messages for the "
                    "cause, then purge the queue."
                ),
            )

        if alarm_topic is not None:
            action = cloudwatch_actions.SnsAction(alarm_topic)
            for alarm in self.alarms.values():
                alarm.add_alarm_action(action)
                alarm.add_ok_action(action)

    def _add(self, name: str, metric: cloudwatch.IMetric, *, threshold: float, description: str) -> None:
        self.alarms[name] = cloudwatch.Alarm(
            self,
            name,
            metric=metric,
            threshold=threshold,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=description,
        )
