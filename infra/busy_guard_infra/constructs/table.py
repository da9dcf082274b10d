"""The busy table: one item per instance, written by the writers and the guard (DESIGN.md, "The table")."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from constructs import Construct

from busy_guard import schema


class BusyTable(Construct):
    """The table the busy-guard stack owns.

    On-demand, point-in-time recovery, TTL on ``expires_at`` (set on release, so released items clean
    themselves up), encryption at rest with the AWS-managed key (writers and the guard need no KMS
    grant), and a stream with new *and old* images: the guard's stream filter matches "the counter
    just went to 0", which needs the old image too. Retained by default, with deletion protection while
    retained.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        table_name: str | None = None,
        removal_policy: RemovalPolicy = RemovalPolicy.RETAIN,
    ) -> None:
        super().__init__(scope, construct_id)
        self.table = dynamodb.Table(
            self,
            "Table",
            table_name=table_name,
            partition_key=dynamodb.Attribute(name=schema.INSTANCE_ID, type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            time_to_live_attribute=schema.TTL,
            stream=dynamodb.StreamViewType.NEW_AND_OLD_IMAGES,
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            removal_policy=removal_policy,
            deletion_protection=removal_policy == RemovalPolicy.RETAIN,
        )

    @staticmethod
    def import_existing(
        scope: Construct, construct_id: str, *, table_name: str, table_stream_arn: str
    ) -> dynamodb.ITable:
        """A table created elsewhere. Synth cannot look up its stream, so its ARN is given.

        The table must match what ``BusyTable`` creates: key ``instance_id`` (S), TTL on ``expires_at``,
        a stream with NEW_AND_OLD_IMAGES, and an encryption key the guard can use (AWS-owned or
        AWS-managed).
        """
        return dynamodb.Table.from_table_attributes(
            scope, construct_id, table_name=table_name, table_stream_arn=table_stream_arn
        )
