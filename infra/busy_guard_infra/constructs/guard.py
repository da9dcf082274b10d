"""The guard: one Lambda, three triggers (lifecycle event, one-minute schedule, filtered table stream),
their dead-letter queues, least-privilege IAM, the hooks on the guarded groups, and alarms.

Usable on its own by a team that builds its Auto Scaling groups in CDK::

    table = BusyTable(self, "BusyTable", table_name="busy_guard.instance_busy").table
    settings = GuardSettings(max_wait_seconds=6 * 3600)
    BusyGuard(self, "BusyGuard", table=table, groups=[my_asg], settings=settings)
    my_asg.role.add_managed_policy(WriterPolicy(self, "BusyWriters", table=table).policy)
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_destinations as destinations
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from busy_guard import schema
from busy_guard_infra.config import (
    RECONCILE_INTERVAL_SECONDS,
    ConfigError,
    GuardSettings,
    group_name_problems,
)
from busy_guard_infra.constants import (
    ASSET_EXCLUDES,
    HANDLER,
    LAMBDAS_DIR,
    METRICS_NAMESPACE,
    POWERTOOLS_LAYER_ACCOUNT,
    POWERTOOLS_LAYER_NAME,
    POWERTOOLS_LAYER_VERSION,
    SERVICE_NAME,
    TERMINATE_EVENT_DETAIL_TYPE,
    TERMINATE_EVENT_SOURCE,
    Env,
)
from busy_guard_infra.constructs.alarms import GuardAlarms
from busy_guard_infra.constructs.hooks import GuardedGroupHooks

TABLE_ACTIONS = ("dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem", "dynamodb:Scan")
"""The guard's look and release are UpdateItems; the schedule tick scans for draining items and reads
items in batches (BatchGetItem) or one at a time (GetItem). No PutItem, no DeleteItem: TTL deletes."""
LIFECYCLE_ACTIONS = ("autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat")
DESCRIBE_ACTIONS = ("autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeAutoScalingInstances")

FUNCTION_TIMEOUT = Duration.seconds(50)
"""Under the one-minute schedule, so ticks never pile up; a tick is a scan, a few describes and a few
API calls per waiting instance."""
FUNCTION_MEMORY_MB = 1024
"""Lambda CPU scales with memory: a 1,000-instance tick is CPU-bound at 256 MB (~26 s estimated
against the 50 s timeout) and ~7-8 s at 1,024 MB (docs/performance.md). Ticks last about a second,
so the cost stays negligible."""
STREAM_RETRY_ATTEMPTS = 5
STREAM_MAX_RECORD_AGE = Duration.hours(1)
QUEUE_RETENTION = Duration.days(14)

QUEUE_NOT_REDRIVEN_REASON = (
    "This queue is itself a dead-letter/on-failure destination: a DLQ behind it would only move the same "
    "undeliverable messages once more. Its depth is alarmed instead, and the one-minute reconcile repairs "
    "the state the lost message was about."
)


def powertools_layer_arn(region: str) -> str:
    return (
        f"arn:aws:lambda:{region}:{POWERTOOLS_LAYER_ACCOUNT}:layer:"
        f"{POWERTOOLS_LAYER_NAME}:{POWERTOOLS_LAYER_VERSION}"
    )


def group_arn(scope: Construct, group_name: str) -> str:
    """``arn:PARTITION:autoscaling:REGION:ACCOUNT:autoScalingGroup:*:autoScalingGroupName/NAME``.

    The ``*`` is the group's UUID, assigned at creation; this is the documented way to scope a policy
    to a group by name.
    """
    return Stack.of(scope).format_arn(
        service="autoscaling",
        resource="autoScalingGroup",
        resource_name=f"*:autoScalingGroupName/{group_name}",
        arn_format=ArnFormat.COLON_RESOURCE_NAME,
    )


class BusyGuard(Construct):
    """Holds terminating instances of the given groups while the busy table says they are busy.

    Give the groups by name (``group_names``, created elsewhere) or as CDK objects (``groups``), or both.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        table: dynamodb.ITable,
        settings: GuardSettings | None = None,
        group_names: Sequence[str] = (),
        groups: Sequence[autoscaling.IAutoScalingGroup] = (),
        alarm_topic: sns.ITopic | None = None,
        log_retention: logs.RetentionDays = logs.RetentionDays.ONE_MONTH,
        log_removal_policy: RemovalPolicy = RemovalPolicy.RETAIN,
    ) -> None:
        super().__init__(scope, construct_id)
        settings = settings or GuardSettings()
        problems = group_name_problems(list(group_names)) if group_names or not groups else []
        if table.table_stream_arn is None:
            problems.append("the busy table must have a stream with NEW_AND_OLD_IMAGES (see BusyTable)")
        if problems:
            raise ConfigError(problems)
        self.settings = settings
        all_names = [*group_names, *(group.auto_scaling_group_name for group in groups)]

        # --- where undelivered and failed work goes ------------------------------------------------
        self.event_dlq = self._queue("EventTargetDlq")
        """EventBridge could not invoke the function (both rules' targets)."""
        self.invoke_failure_queue = self._queue("InvokeFailureQueue")
        """The function failed on an event after Lambda's async retries."""
        self.stream_failure_queue = self._queue("StreamFailureQueue")
        """Stream batches that still failed after bisecting and retrying (records' metadata only)."""

        # --- the function ----------------------------------------------------------------------------
        self.log_group = logs.LogGroup(
            self, "LogGroup", retention=log_retention, removal_policy=log_removal_policy
        )
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description="busy-guard Lambda: reads/marks the busy table, completes and heartbeats its hooks",
        )
        self.log_group.grant_write(self.role)
        self.function = lambda_.Function(
            self,
            "Function",
            description="busy-guard: holds terminating instances while the busy table says they are busy",
            runtime=lambda_.Runtime.PYTHON_3_13,
            architecture=lambda_.Architecture.ARM_64,
            handler=HANDLER,
            code=lambda_.Code.from_asset(str(LAMBDAS_DIR), exclude=list(ASSET_EXCLUDES)),
            layers=[
                lambda_.LayerVersion.from_layer_version_arn(
                    self, "PowertoolsLayer", powertools_layer_arn(Stack.of(self).region)
                )
            ],
            role=self.role,
            log_group=self.log_group,
            tracing=lambda_.Tracing.ACTIVE,
            timeout=FUNCTION_TIMEOUT,
            memory_size=FUNCTION_MEMORY_MB,
            # Async invocations (both rules): a stale event is worth little, the next tick redoes it.
            retry_attempts=2,
            max_event_age=Duration.minutes(15),
            on_failure=destinations.SqsDestination(self.invoke_failure_queue),
            environment={
                Env.TABLE: table.table_name,
                Env.ASG_NAMES: ",".join(all_names),
                Env.HOOK_NAME: settings.hook_name,
                Env.HEARTBEAT_TIMEOUT: str(settings.heartbeat_timeout_seconds),
                Env.MAX_WAIT: str(settings.max_wait_seconds),
                Env.MAX_WAIT_RESULT: settings.max_wait_result,
                Env.CLOCK_SKEW: str(settings.clock_skew_seconds),
                Env.LEGACY_STALE: str(settings.legacy_stale_seconds),
                Env.RECONCILE_INTERVAL: str(RECONCILE_INTERVAL_SECONDS),
                Env.RELEASED_TTL: str(settings.released_ttl_seconds),
                "POWERTOOLS_SERVICE_NAME": SERVICE_NAME,
                "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
                "POWERTOOLS_LOG_LEVEL": "INFO",
            },
        )

        # --- least privilege -----------------------------------------------------------------------
        table.grant(self.role, *TABLE_ACTIONS)
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="GuardedHooksOnly",
                actions=list(LIFECYCLE_ACTIONS),
                resources=[group_arn(self, name) for name in all_names],
            )
        )
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="DescribeNeedsWildcard",
                actions=list(DESCRIBE_ACTIONS),
                resources=["*"],
            )
        )

        # --- the three triggers ----------------------------------------------------------------------
        self.lifecycle_rule = events.Rule(
            self,
            "LifecycleRule",
            description="busy-guard: a guarded group wants to terminate an instance",
            event_pattern=events.EventPattern(
                source=[TERMINATE_EVENT_SOURCE],
                detail_type=[TERMINATE_EVENT_DETAIL_TYPE],
                detail={"AutoScalingGroupName": all_names, "LifecycleHookName": [settings.hook_name]},
            ),
        )
        self.lifecycle_rule.add_target(
            targets.LambdaFunction(
                self.function,
                dead_letter_queue=self.event_dlq,
                retry_attempts=20,
                max_event_age=Duration.hours(1),
            )
        )
        self.schedule_rule = events.Rule(
            self,
            "ReconcileSchedule",
            description="busy-guard: the level-triggered reconcile and heartbeat, once a minute",
            schedule=events.Schedule.rate(Duration.seconds(RECONCILE_INTERVAL_SECONDS)),
        )
        self.schedule_rule.add_target(
            targets.LambdaFunction(
                self.function,
                dead_letter_queue=self.event_dlq,
                # A late tick is worthless: the next one is a minute away.
                retry_attempts=2,
                max_event_age=Duration.seconds(RECONCILE_INTERVAL_SECONDS),
            )
        )
        self.function.add_event_source(
            event_sources.DynamoEventSource(
                table,
                starting_position=lambda_.StartingPosition.LATEST,
                batch_size=100,
                bisect_batch_on_error=True,
                # The handler returns batchItemFailures, so only the failed records are retried.
                report_batch_item_failures=True,
                retry_attempts=STREAM_RETRY_ATTEMPTS,
                max_record_age=STREAM_MAX_RECORD_AGE,
                on_failure=event_sources.SqsDlq(self.stream_failure_queue),
                filters=[lambda_.FilterCriteria.filter(schema.stream_filter_pattern())],
            )
        )

        # --- the hooks, created only once the guard can answer them --------------------------------
        self.hooks = GuardedGroupHooks(
            self, "Hooks", settings=settings, group_names=group_names, groups=groups
        )
        self.hooks.depend_on(self.function, self.role, self.lifecycle_rule, self.schedule_rule)

        # --- alarms --------------------------------------------------------------------------------
        self.alarms = GuardAlarms(
            self,
            "Alarms",
            function=self.function,
            queues={
                "EventTargetDlq": self.event_dlq,
                "InvokeFailureQueue": self.invoke_failure_queue,
                "StreamFailureQueue": self.stream_failure_queue,
            },
            alarm_topic=alarm_topic,
        )

        self._suppress_nag_findings()

    def _queue(self, construct_id: str) -> sqs.Queue:
        queue = sqs.Queue(
            self,
            construct_id,
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=QUEUE_RETENTION,
        )
        NagSuppressions.add_resource_suppressions(
            queue, [NagPackSuppression(id="AwsSolutions-SQS3", reason=QUEUE_NOT_REDRIVEN_REASON)]
        )
        return queue

    def _suppress_nag_findings(self) -> None:
        NagSuppressions.add_resource_suppressions(
            self.function,
            [
                NagPackSuppression(
                    id="AwsSolutions-L1",
                    reason=(
                        "Python 3.13 is deliberate and supported: the pinned Powertools layer is its "
                        "python313-arm64 build and the guard is tested on 3.13. Move the runtime and the "
                        "layer together, in one reviewed change, when adopting 3.14."
                    ),
                )
            ],
        )
        NagSuppressions.add_resource_suppressions(
            self.role,
            [
                NagPackSuppression(
                    id="AwsSolutions-IAM5",
                    reason=(
                        "Resource '*' only for actions with no resource-level permissions: "
                        "autoscaling:DescribeAutoScalingGroups and DescribeAutoScalingInstances (the tick "
                        "lists the guarded groups' instances in Terminating:Wait), dynamodb:ListStreams "
                        "(granted by the DynamoDB event source), and xray:PutTraceSegments and "
                        "PutTelemetryRecords (active tracing). Every other action names its resource."
                    ),
                    applies_to=["Resource::*"],
                ),
                NagPackSuppression(
                    id="AwsSolutions-IAM5",
                    reason=(
                        "The wildcard is the group-id UUID in the ASG ARN, which Auto Scaling assigns at "
                        "creation: arn:...:autoScalingGroup:*:autoScalingGroupName/NAME is the documented "
                        "way to scope CompleteLifecycleAction and RecordLifecycleActionHeartbeat to one "
                        "named group, and it matches only that group name."
                    ),
                    applies_to=[
                        {
                            "regex": (
                                "/^Resource::arn:<AWS::Partition>:autoscaling:<AWS::Region>:<AWS::AccountId>"
                                ":autoScalingGroup:\\*:autoScalingGroupName\\/.+$/"
                            )
                        }
                    ],
                ),
            ],
            apply_to_children=True,
        )
