"""The customer-managed policy that the writers' instance role attaches."""

from __future__ import annotations

from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from constructs import Construct

WRITER_ACTIONS = ("dynamodb:UpdateItem",)
"""Begin, heartbeat and end are each one conditional UpdateItem; the writer never reads, scans or
deletes. (The operator CLI's ``status`` reads, but that runs under an operator role, not this one.)"""


class WriterPolicy(Construct):
    """``dynamodb:UpdateItem`` on the busy table only, and nothing else.

    The table is encrypted with the AWS-managed key, so no KMS statement is needed. Attach it to the
    instance role of every group whose application code uses the writer library: by ARN (the stack
    exports it), or in CDK with ``role.add_managed_policy(writer_policy.policy)``.
    """

    def __init__(self, scope: Construct, construct_id: str, *, table: dynamodb.ITable) -> None:
        super().__init__(scope, construct_id)
        self.policy = iam.ManagedPolicy(
            self,
            "Policy",
            description="busy-guard writers: lease begin/heartbeat/end on the busy table (UpdateItem only)",
            statements=[
                iam.PolicyStatement(
                    sid="BusyGuardLeaseWrites",
                    actions=list(WRITER_ACTIONS),
                    resources=[table.table_arn],
                )
            ],
        )
