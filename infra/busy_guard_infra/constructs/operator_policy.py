"""The customer-managed policy for operators: exactly the calls ``busy-guard status`` and
``busy-guard release`` make, and nothing else."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from constructs import Construct

STATUS_TABLE_ACTIONS = ("dynamodb:BatchGetItem", "dynamodb:Scan")
"""status: the groups' items in batches (``get_many``), the draining items, or the whole table."""
RELEASE_TABLE_ACTIONS = ("dynamodb:GetItem", "dynamodb:UpdateItem")
"""release: the instance's item for the prompt (``get``), then the recorded release (``release``)."""
DESCRIBE_ACTIONS = ("autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeAutoScalingInstances")
"""status lists the groups; release finds the instance's group when --asg is not given. Neither has
resource-level permissions."""
RELEASE_HOOK_ACTIONS = ("autoscaling:CompleteLifecycleAction",)
"""release completes the hook with CONTINUE; it never heartbeats. (``sts:GetCallerIdentity``, which
release uses to record who released, needs no permission.)"""


class OperatorPolicy(Construct):
    """Attach to the role operators run ``busy-guard status`` and ``busy-guard release`` with."""

    def __init__(
        self, scope: Construct, construct_id: str, *, table: dynamodb.ITable, group_arns: Sequence[str]
    ) -> None:
        super().__init__(scope, construct_id)
        self.policy = iam.ManagedPolicy(
            self,
            "Policy",
            description="busy-guard operators: busy-guard status and busy-guard release, nothing more",
            statements=[
                iam.PolicyStatement(
                    sid="ReadAndRecordOnTheBusyTable",
                    actions=[*STATUS_TABLE_ACTIONS, *RELEASE_TABLE_ACTIONS],
                    resources=[table.table_arn],
                ),
                iam.PolicyStatement(
                    sid="CompleteTheGuardedHooks",
                    actions=list(RELEASE_HOOK_ACTIONS),
                    resources=list(group_arns),
                ),
                iam.PolicyStatement(
                    sid="DescribeNeedsWildcard",
                    actions=list(DESCRIBE_ACTIONS),
                    resources=["*"],
                ),
            ],
        )
