"""The guard: one Lambda, three triggers (lifecycle event, one-minute schedule, filtered table stream),
their dead-letter queues, least-privilege IAM, the hooks on the guarded groups, and alarms.

Usable on its own by a team that builds its Auto Scaling groups in CDK::

    table = BusyTable(self, "BusyTable", table_name="busy_guard.instance_busy").table
    settings = GuardSettings(max_wait_seconds=6 * 3600)
    BusyGuard(self, "BusyGuard", table=table, groups=[my_asg], settings=settings)
    my_asg.role.add_managed_policy(WriterPolicy(self, "BusyWriters", table=table).policy)
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from aws_cdk import Annotations, ArnFormat, Duration, RemovalPolicy, Stack, Token
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
from busy_guard import settings as S
from busy_guard.settings import EVENT_BUS
from busy_guard_infra.config import (
    RECONCILE_INTERVAL_SECONDS,
    ConfigError,
    GuardSettings,
    group_name_problems,
)
from busy_guard_infra.constants import (
    ASSET_EXCLUDES,
    HANDLER,
    LAMBDA_DEPS_DIR,
    LAMBDA_DEPS_EXCLUDES,
    LAMBDAS_DIR,
    METRICS_NAMESPACE,
    SERVICE_NAME,
    TERMINATE_EVENT_DETAIL_TYPE,
    TERMINATE_EVENT_SOURCE,
    Env,
)
from busy_guard_infra.constructs.alarms import GuardAlarms
from busy_guard_infra.constructs.dashboard import GuardDashboard
from busy_guard_infra.constructs.hooks import GuardedGroupHooks
from busy_guard_infra.constructs.operator_policy import OperatorPolicy
from busy_guard_infra.constructs.update_policy import judge_update_policies

TABLE_ACTIONS = ("dynamodb:BatchGetItem", "dynamodb:UpdateItem", "dynamodb:Scan")
"""The guard's look and release are UpdateItems; the schedule tick scans for marked items and reads
the others in batches (BatchGetItem). No GetItem (the guard never reads one item alone: guard/table.py's
``get`` is the CLI's), no PutItem, no DeleteItem: TTL deletes."""
LEGACY_COMPANION_ACTIONS = ("dynamodb:ConditionCheckItem",)
"""Only under the isolated scheme with ``readLegacyKeys``: the guard's release is one TransactWriteItems,
an Update of the instance's ARN item and a ConditionCheck that its bare-id companion item holds no live
work. The Update is governed by ``dynamodb:UpdateItem`` (already in TABLE_ACTIONS); the ConditionCheck
needs ``dynamodb:ConditionCheckItem``. "Using IAM with DynamoDB transactions",
https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis-iam.html: "Permissions
for Put, Update, Delete, and Get actions are governed by the permissions used for the underlying PutItem,
UpdateItem, DeleteItem, and GetItem operations. For the ConditionCheck action, you can use the
dynamodb:ConditionCheckItem permission in IAM policies." TransactWriteItems itself is no IAM action."""
LIFECYCLE_ACTIONS = ("autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat")
DESCRIBE_ACTIONS = (
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:DescribeLifecycleHooks",
    "autoscaling:DescribeWarmPool",
)
"""The tick lists the groups' instances and their warm pools, and reads our hook's real timeout;
DescribeAutoScalingInstances is only the CLI's."""

FUNCTION_TIMEOUT = Duration.seconds(S.FUNCTION_TIMEOUT_SECONDS)
"""Under the one-minute schedule, so ticks never pile up; a tick is a scan, a few describes and a few
API calls per waiting instance."""
FUNCTION_MEMORY_MB = 1024
"""Lambda CPU scales with memory: a 1,000-instance tick is CPU-bound at 256 MB (~26 s estimated
against the 50 s timeout) and ~7-8 s at 1,024 MB (docs/performance.md). Ticks last about a second,
so the cost stays negligible."""
ASYNC_RETRY_ATTEMPTS = 0
"""A failed invocation from either rule is not run again by Lambda: the next tick, at most a minute
away, is the retry, and it starts from the table and Auto Scaling's state instead of an old event.
(Throttled invocations are still queued and retried by Lambda until ``ASYNC_MAX_EVENT_AGE``.)"""
ASYNC_MAX_EVENT_AGE = Duration.seconds(S.ASYNC_MAX_EVENT_AGE_SECONDS)
STREAM_RETRY_ATTEMPTS = 5
STREAM_MAX_RECORD_AGE = Duration.hours(1)
QUEUE_RETENTION = Duration.days(14)

RUNTIME_PINNED_REASON = (
    "Python 3.13 is deliberate and supported: the dependencies layer is built for cp313 arm64 and the "
    "guard is tested on 3.13. Move the runtime and the layer's wheels together, in one reviewed change, "
    "when adopting 3.14."
)
GROUP_ARN_WILDCARD_REASON = (
    "The wildcard is the group-id UUID in the ASG ARN, which Auto Scaling assigns at creation: "
    "arn:...:autoScalingGroup:*:autoScalingGroupName/NAME is the documented way to scope "
    "CompleteLifecycleAction and RecordLifecycleActionHeartbeat to one named group, and it matches only "
    "that group name."
)
GROUP_ARN_FINDING = {
    "regex": (
        # partition, region and account as tokens or, in a stack with an environment, as literals
        "/^Resource::arn:.+:autoscaling:.+:autoScalingGroup:\\*:autoScalingGroupName\\/.+$/"
    )
}
QUEUE_NOT_REDRIVEN_REASON = (
    "This queue is itself a dead-letter/on-failure destination: a DLQ behind it would only move the same "
    "undeliverable messages once more. Its depth is alarmed instead, and the one-minute reconcile repairs "
    "the state the lost message was about."
)


ASSUMED_TOKEN_NAME_LENGTH = S.GROUP_NAME_LENGTH[1]
"""A group name that is a token (a group created in the same app) is unknown at synth: its size is
counted as the longest a name can be, and an overrun is a warning, not an error."""
ACCOUNT_ID_LENGTH = 12
PARTITION_NAME_MAX_LENGTH = 32
"""The stack's partition (``AWS::Partition``) is a token at synth. Partition names are short (``aws``,
``aws-cn``, ``aws-us-gov``, ``aws-iso-b``: 10 characters at most today); 32 leaves room for new ones
without counting it at a table name's 255."""
TOKEN_VALUE_LENGTHS = {S.Env.ACCOUNT_ID: ACCOUNT_ID_LENGTH, S.Env.PARTITION: PARTITION_NAME_MAX_LENGTH}
"""Environment values that are tokens, counted at these lengths; any other token (the table name) at
the longest table name."""


def size_problems(
    names: Sequence[str], environment: dict[str, str], *, hook_name: str
) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the sizes AWS limits: the lifecycle rule's event pattern (EventBridge's
    default quota, in characters) and the function's environment (4 KB of keys and values).

    Names that are tokens are counted at the longest a group name can be: exceeding a limit only
    because of them is a warning, since their real length is known only at deploy time.
    """
    known = [name for name in names if not Token.is_unresolved(name)]
    assumed = [name if name in known else "x" * ASSUMED_TOKEN_NAME_LENGTH for name in names]

    def pattern_size(group_names: Sequence[str]) -> int:
        pattern = {
            "account": ["0" * 12],
            "source": [TERMINATE_EVENT_SOURCE],
            "detail-type": [TERMINATE_EVENT_DETAIL_TYPE],
            "detail": {"AutoScalingGroupName": list(group_names), "LifecycleHookName": [hook_name]},
        }
        return len(json.dumps(pattern, separators=(",", ":")))

    def environment_size(group_names: Sequence[str]) -> int:
        sizes = {key: len(value.encode()) for key, value in environment.items()}
        sizes[Env.ASG_NAMES] = len(",".join(group_names).encode())
        for key, value in environment.items():
            if key != Env.ASG_NAMES and Token.is_unresolved(value):
                sizes[key] = TOKEN_VALUE_LENGTHS.get(key, S.TABLE_NAME_LENGTH[1])
        return sum(len(key.encode()) for key in environment) + sum(sizes.values())

    checks = (
        (
            "the lifecycle rule's event pattern",
            pattern_size,
            S.EVENT_PATTERN_MAX_CHARS,
            "characters",
            "guard fewer groups per stack, or shorter names (the quota can be raised to 4096 on request)",
        ),
        (
            "the guard function's environment",
            environment_size,
            S.LAMBDA_ENVIRONMENT_MAX_BYTES,
            "bytes",
            "guard fewer groups per stack, or shorter names",
        ),
    )
    errors: list[str] = []
    warnings: list[str] = []
    for what, size, limit, unit, fix in checks:
        if size(known) > limit:
            errors.append(f"{what} would be {size(known)} {unit}, over AWS's limit of {limit}: {fix}")
        elif size(assumed) > limit:
            warnings.append(
                f"{what} may be up to {size(assumed)} {unit} (names known only at deploy counted at "
                f"{ASSUMED_TOKEN_NAME_LENGTH} characters), over AWS's limit of {limit}: {fix}"
            )
    return errors, warnings


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


def default_event_bus_arn(scope: Construct) -> str:
    """``arn:PARTITION:events:REGION:ACCOUNT:event-bus/default``: where the held/released events go."""
    return Stack.of(scope).format_arn(
        service="events",
        resource="event-bus",
        resource_name=EVENT_BUS,
        arn_format=ArnFormat.SLASH_RESOURCE_NAME,
    )


class BusyGuard(Construct):
    """Holds terminating instances of the given groups while the busy table says they are busy.

    Give the groups by name (``group_names``, created elsewhere) or as CDK objects (``groups``), or both.
    Each ``AutoScalingGroup`` object's update policy is judged (see ``update_policy``): a replacing
    update is refused, a rolling update gets a warning, an instance refresh is accepted, and
    ``add_instance_refresh=True`` gives a group without one a launch-before-terminate refresh.
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
        add_instance_refresh: bool = False,
    ) -> None:
        super().__init__(scope, construct_id)
        settings = settings or GuardSettings()
        problems = group_name_problems(list(group_names)) if group_names or not groups else []
        if table.table_stream_arn is None:
            problems.append("the busy table must have a stream with NEW_AND_OLD_IMAGES (see BusyTable)")
        if problems:
            raise ConfigError(problems)
        self.settings = settings
        judge_update_policies(self, groups, add_instance_refresh=add_instance_refresh)
        all_names = [*group_names, *(group.auto_scaling_group_name for group in groups)]
        stack = Stack.of(self)

        # --- where undelivered and failed work goes ------------------------------------------------
        self.event_dlq = self._queue("EventTargetDlq")
        """EventBridge could not invoke the function (both rules' targets)."""
        self.invoke_failure_queue = self._queue("InvokeFailureQueue")
        """The function failed on an event (no async retries: the next tick is the retry)."""
        self.stream_failure_queue = self._queue("StreamFailureQueue")
        """Stream batches that still failed after bisecting and retrying (records' metadata only)."""
        self.queues = {
            "EventTargetDlq": self.event_dlq,
            "InvokeFailureQueue": self.invoke_failure_queue,
            "StreamFailureQueue": self.stream_failure_queue,
        }
        """Every queue of undelivered or failed work, by name: alarmed and on the dashboard."""

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
        environment = {
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
            Env.ACCOUNT_ID: stack.account,
            Env.OBSERVE_ONLY: "true" if settings.observe_only else "false",
            # The isolated scheme's keys are arn:PARTITION:ec2:REGION:ACCOUNT:instance/ID: the guard
            # builds them from these, ACCOUNT_ID and Lambda's own AWS_REGION.
            Env.KEY_SCHEME: settings.key_scheme,
            Env.READ_LEGACY_KEYS: "true" if settings.reads_legacy_keys else "false",
            Env.PARTITION: stack.partition,
            "POWERTOOLS_SERVICE_NAME": SERVICE_NAME,
            "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
            "POWERTOOLS_LOG_LEVEL": "INFO",
        }
        self._check_sizes(all_names, environment)
        self.function = lambda_.Function(
            self,
            "Function",
            description="busy-guard: holds terminating instances while the busy table says they are busy",
            runtime=lambda_.Runtime.PYTHON_3_13,
            architecture=lambda_.Architecture.ARM_64,
            handler=HANDLER,
            code=lambda_.Code.from_asset(str(LAMBDAS_DIR), exclude=list(ASSET_EXCLUDES)),
            layers=[self._dependencies_layer()],
            role=self.role,
            log_group=self.log_group,
            tracing=lambda_.Tracing.ACTIVE,
            timeout=FUNCTION_TIMEOUT,
            memory_size=FUNCTION_MEMORY_MB,
            reserved_concurrent_executions=settings.reserved_concurrency,
            retry_attempts=ASYNC_RETRY_ATTEMPTS,
            max_event_age=ASYNC_MAX_EVENT_AGE,
            on_failure=destinations.SqsDestination(self.invoke_failure_queue),
            environment=environment,
        )

        # --- least privilege -----------------------------------------------------------------------
        table.grant(self.role, *TABLE_ACTIONS)
        if settings.reads_legacy_keys:
            # The release's ConditionCheck on the bare-id companion item (LEGACY_COMPANION_ACTIONS).
            self.role.add_to_principal_policy(
                iam.PolicyStatement(
                    sid="ProveLegacyCompanionIdle",
                    actions=list(LEGACY_COMPANION_ACTIONS),
                    resources=[table.table_arn],
                )
            )
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="GuardedHooksOnly",
                actions=list(LIFECYCLE_ACTIONS),
                resources=[group_arn(self, name) for name in all_names],
            )
        )
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="EventsForPeopleDefaultBusOnly",
                actions=["events:PutEvents"],
                resources=[default_event_bus_arn(self)],
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
                account=[stack.account],
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
                max_event_age=Duration.seconds(S.RULE_TARGET_MAX_EVENT_AGE_SECONDS),
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
            queues=self.queues,
            alarm_topic=alarm_topic,
        )
        if alarm_topic is None:
            Annotations.of(self).add_warning_v2(
                "busy-guard:no-alarm-topic",
                "No alarm topic (alarmTopicArn, or BusyGuard's alarm_topic): the guard's alarms notify "
                "nobody. A failing guard, lost events and interrupted work then show only on the dashboard.",
            )
        self.dashboard = GuardDashboard(
            self,
            "Dashboard",
            function=self.function,
            queues=self.queues,
        )
        self.operator_policy = OperatorPolicy(
            self,
            "OperatorPolicy",
            table=table,
            group_arns=[group_arn(self, name) for name in all_names],
        )

        self._suppress_nag_findings()

    def _dependencies_layer(self) -> lambda_.ILayerVersion:
        """Powertools and the rest of the guard's pinned dependencies, as this stack's own layer: the
        same in every partition and region, and exactly the versions the tests run."""
        if not (LAMBDA_DEPS_DIR / "python").is_dir():
            raise ConfigError(
                [f"the guard's dependencies are not built: run `make lambda-deps` ({LAMBDA_DEPS_DIR})"]
            )
        return lambda_.LayerVersion(
            self,
            "DependenciesLayer",
            description="busy-guard: Powertools, pydantic and the X-Ray SDK (infra/lambda-requirements.txt)",
            code=lambda_.Code.from_asset(str(LAMBDA_DEPS_DIR), exclude=list(LAMBDA_DEPS_EXCLUDES)),
            compatible_runtimes=[lambda_.Runtime.PYTHON_3_13],
            compatible_architectures=[lambda_.Architecture.ARM_64],
        )

    def _check_sizes(self, names: Sequence[str], environment: dict[str, str]) -> None:
        """The group names go into the lifecycle rule's pattern and the function's environment, both of
        which AWS limits in size. A deploy would fail late and half-way, so synth fails first."""
        problems, unsure = size_problems(names, environment, hook_name=self.settings.hook_name)
        if problems:
            raise ConfigError(problems)
        for warning in unsure:
            Annotations.of(self).add_warning_v2("busy-guard:size-unknown", warning)

    def _queue(self, construct_id: str) -> sqs.Queue:
        queue = sqs.Queue(
            self,
            construct_id,
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=QUEUE_RETENTION,
        )
        NagSuppressions.add_resource_suppressions(
            queue,
            [
                NagPackSuppression(id=rule, reason=QUEUE_NOT_REDRIVEN_REASON)
                for rule in ("AwsSolutions-SQS3", "Serverless-SQSRedrivePolicy")
            ],
        )
        return queue

    def _suppress_nag_findings(self) -> None:
        NagSuppressions.add_resource_suppressions(
            self.function,
            [
                *(
                    NagPackSuppression(id=rule, reason=RUNTIME_PINNED_REASON)
                    for rule in ("AwsSolutions-L1", "Serverless-LambdaLatestVersion")
                ),
                NagPackSuppression(
                    id="Serverless-LambdaDLQ",
                    reason=(
                        "Failed async invocations go to an on-failure destination (InvokeFailureQueue, "
                        "EventInvokeConfig), which Lambda recommends over a DeadLetterConfig and which "
                        "records the error too; stream batches have their own on-failure queue. A DLQ "
                        "as well would split the same failures over two queues."
                    ),
                ),
            ],
        )
        NagSuppressions.add_resource_suppressions(
            self.operator_policy.policy,
            [
                NagPackSuppression(
                    id="AwsSolutions-IAM5",
                    reason=(
                        "Resource '*' only for autoscaling:DescribeAutoScalingGroups and "
                        "DescribeAutoScalingInstances, which have no resource-level permissions: status "
                        "lists the guarded groups and release finds an instance's group. The table and "
                        "the lifecycle actions are scoped to their resources."
                    ),
                    applies_to=["Resource::*"],
                ),
                NagPackSuppression(
                    id="AwsSolutions-IAM5", reason=GROUP_ARN_WILDCARD_REASON, applies_to=[GROUP_ARN_FINDING]
                ),
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
                    id="AwsSolutions-IAM5", reason=GROUP_ARN_WILDCARD_REASON, applies_to=[GROUP_ARN_FINDING]
                ),
            ],
            apply_to_children=True,
        )
