"""The customer-managed policy that the writers' instance role attaches."""

from __future__ import annotations

from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from constructs import Construct

from busy_guard import settings as S

WRITER_ACTIONS = ("dynamodb:UpdateItem",)
"""Begin, heartbeat and end are each one conditional UpdateItem; the writer never reads, scans or
deletes. (The operator CLI's ``status`` reads, but that runs under an operator role, not this one.)"""

OWN_ITEM_ONLY = {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["${ec2:SourceInstanceARN}"]}}
"""The isolated scheme: a writer may update only the item whose partition key is the ARN of the
instance whose instance-profile credentials signed the request.

- ``ec2:SourceInstanceARN`` is set on requests signed with an instance profile's role credentials and is
  usable outside EC2. Amazon EC2 User Guide, "Identity-based policies for Amazon EC2", ec2:SourceInstanceARN
  condition key (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/iam-policies-for-amazon-ec2.html):
  "Use ec2:SourceInstanceARN to specify the ARN of the instance from which a request is made. This is an
  AWS global condition key, which means that you can use it with services other than Amazon EC2."
  IAM User Guide, policy variables (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_variables.html,
  its list of keys usable as policy variables, up to March 2023): "This key is present only when the
  request comes from an Amazon EC2 instance using an IAM role associated with an EC2 instance profile."
- Without it (credentials that are not an instance profile's: a task role, a user, an assumed role) the
  variable has no value and nothing matches, so the write is refused: "When you use a variable with no
  value in the condition element of an IAM policy, ... StringEquals or StringLike do not match, and the
  policy statement does not take effect." (same page, "Policy variables with no value").
- Policy variables in ``dynamodb:LeadingKeys`` and the ``ForAllValues`` form: DynamoDB Developer Guide,
  "Using IAM policy conditions for fine-grained access control"
  (https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/specifying-conditions.html), whose
  examples condition ``"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["${www.amazon.com:user_id}"]}``:
  "The key name LeadingKeys is plural, even if the key is used with single-item actions. In addition, you
  must use the ForAllValues modifier when using LeadingKeys in a condition." Policy variables need policy
  version 2012-10-17, which every CDK policy document carries.
"""

OWN_ITEM_OR_BARE_IDS = {
    "ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["${ec2:SourceInstanceARN}", "i-*"]}
}
"""The isolated scheme while a migrated table's legacy writers still run (``legacy_writers=True``): an
instance's own ARN item, or any bare-id item. ARN items stay each instance's own; bare-id items keep
the legacy hole, because no IAM variable names a bare instance id and a writer not yet rolled to the
isolated scheme must still begin, heartbeat and end its leases there. (Policy variables work with the
string operators, StringLike included: IAM User Guide, "Condition element",
https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_variables.html.)"""

TLS_ONLY = {"Bool": {"aws:SecureTransport": "false"}}


class WriterPolicy(Construct):
    """``dynamodb:UpdateItem`` on the busy table only, and nothing else; never over plain HTTP.

    ``key_scheme`` is the table's (``GuardSettings.key_scheme``):

    - ``isolated`` (the default): each instance may update only its own item, the one keyed by its ARN
      (``arn:PARTITION:ec2:REGION:ACCOUNT:instance/ID``), and only with its instance profile's credentials.
    - ``legacy``: items are keyed by bare instance ids, which no IAM condition can name, so any writer
      with this policy can update any instance's item (the replaced system's hole, kept for an imported
      table until it is migrated; README, "Key schemes and migrating a legacy table").
    - ``isolated`` with ``legacy_writers=True``: the migration's middle step. ARN items as under
      ``isolated``, and bare-id items (``i-*``) open to every writer as under ``legacy``, so writers not
      yet rolled to ``BUSY_GUARD_KEY_SCHEME=isolated`` keep their leases. Turn it off with
      ``readLegacyKeys=false``: the stack sets it only for an imported table while bare-id items are read.

    The table is encrypted with the AWS-managed key, so no KMS statement is needed. Attach it to the
    instance role of every group whose application code uses the writer library: by ARN (the stack
    exports it), or in CDK with ``role.add_managed_policy(writer_policy.policy)``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        table: dynamodb.ITable,
        key_scheme: str = S.DEFAULT_KEY_SCHEME,
        legacy_writers: bool = False,
    ) -> None:
        super().__init__(scope, construct_id)
        if key_scheme not in S.KEY_SCHEMES:
            raise ValueError(f"key_scheme must be one of {', '.join(S.KEY_SCHEMES)}; got {key_scheme!r}")
        isolated = key_scheme == S.KEY_SCHEME_ISOLATED
        if legacy_writers and not isolated:
            raise ValueError(
                "legacy_writers is the isolated scheme's migration step; legacy allows them anyway"
            )
        self.key_scheme = key_scheme
        self.legacy_writers = legacy_writers
        if not isolated:
            condition, scope_text = None, "legacy bare-id keys: any writer can update any instance's item"
        elif legacy_writers:
            condition = OWN_ITEM_OR_BARE_IDS
            scope_text = "each instance on its own ARN item; bare-id items open to every writer (migration)"
        else:
            condition, scope_text = OWN_ITEM_ONLY, "each instance on its own item (keyed by its instance ARN)"
        self.policy = iam.ManagedPolicy(
            self,
            "Policy",
            description=f"busy-guard writers: lease writes on the busy table (UpdateItem only), {scope_text}",
            statements=[
                iam.PolicyStatement(
                    sid="BusyGuardLeaseWrites",
                    actions=list(WRITER_ACTIONS),
                    resources=[table.table_arn],
                    # See OWN_ITEM_ONLY for the AWS documentation this condition relies on.
                    conditions=condition,
                ),
                iam.PolicyStatement(
                    sid="DenyPlainHttp",
                    effect=iam.Effect.DENY,
                    actions=["dynamodb:*"],
                    resources=[table.table_arn, f"{table.table_arn}/*"],
                    conditions=TLS_ONLY,
                ),
            ],
        )
