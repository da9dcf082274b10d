"""The busy-guard stack: the table (or an existing one), the guard on the named groups, the writer policy,
and the outputs other stacks and teams need."""

from __future__ import annotations

from typing import Any

from aws_cdk import CfnOutput, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_sns as sns
from constructs import Construct

from busy_guard_infra.config import BusyGuardConfig
from busy_guard_infra.constants import Env
from busy_guard_infra.constructs.guard import BusyGuard
from busy_guard_infra.constructs.table import BusyTable
from busy_guard_infra.constructs.writer_policy import WriterPolicy

DESCRIPTION = (
    "busy-guard: keeps EC2 Auto Scaling from terminating instances in the middle of stateful work "
    "(lifecycle hook + DynamoDB lease table + guard Lambda)"
)


class BusyGuardStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, config: BusyGuardConfig, **kwargs: Any
    ) -> None:
        super().__init__(scope, construct_id, description=DESCRIPTION, **kwargs)
        self.config = config
        removal_policy = RemovalPolicy[config.removal_policy]

        self.table: dynamodb.ITable
        if config.import_table:
            assert config.table_stream_arn is not None  # validated by BusyGuardConfig
            self.table = BusyTable.import_existing(
                self, "BusyTable", table_name=config.table_name, table_stream_arn=config.table_stream_arn
            )
        else:
            self.table = BusyTable(
                self, "BusyTable", table_name=config.table_name, removal_policy=removal_policy
            ).table

        alarm_topic = (
            sns.Topic.from_topic_arn(self, "AlarmTopic", config.alarm_topic_arn)
            if config.alarm_topic_arn
            else None
        )
        self.guard = BusyGuard(
            self,
            "Guard",
            table=self.table,
            settings=config.settings,
            group_names=config.asg_names,
            alarm_topic=alarm_topic,
            log_removal_policy=removal_policy,
        )
        # An imported table migrating to the isolated scheme still has writers on bare ids until they are
        # rolled: they keep their leases while the guard reads bare-id items (README, "Key schemes").
        self.writer_policy = WriterPolicy(
            self,
            "WriterPolicy",
            table=self.table,
            key_scheme=config.settings.key_scheme,
            legacy_writers=config.import_table and config.settings.reads_legacy_keys,
        )

        CfnOutput(
            self,
            "TableName",
            description="The busy table the writers lease on (BUSY_GUARD_TABLE for the writer library)",
            value=self.table.table_name,
            export_name=f"{self.stack_name}-TableName",
        )
        CfnOutput(
            self,
            "WriterPolicyArn",
            description="Attach to the instance role of every guarded group's application",
            value=self.writer_policy.policy.managed_policy_arn,
            export_name=f"{self.stack_name}-WriterPolicyArn",
        )
        CfnOutput(
            self,
            "KeyScheme",
            description=(
                "How the table's items are keyed (isolated: instance ARN; legacy: bare instance id): "
                f"{Env.KEY_SCHEME} for the writer library"
            ),
            value=config.settings.key_scheme,
            export_name=f"{self.stack_name}-KeyScheme",
        )
        CfnOutput(
            self,
            "OperatorPolicyArn",
            description="Attach to the operators' role: exactly what busy-guard status and release call",
            value=self.guard.operator_policy.policy.managed_policy_arn,
            export_name=f"{self.stack_name}-OperatorPolicyArn",
        )
        CfnOutput(
            self,
            "DashboardName",
            description="The CloudWatch dashboard to watch during a refresh",
            value=self.guard.dashboard.dashboard.dashboard_name,
        )
        CfnOutput(
            self,
            "GuardFunctionName",
            description="The guard Lambda (its log group holds every decision)",
            value=self.guard.function.function_name,
        )
        CfnOutput(
            self,
            "HookName",
            description="The lifecycle hook on each guarded group",
            value=config.settings.hook_name,
        )
