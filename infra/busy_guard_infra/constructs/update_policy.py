"""What each CloudFormation update policy of an ``AutoScalingGroup`` does with the guard, judged at synth.

- ``AutoScalingReplacingUpdate``: CloudFormation creates a new group and deletes the old one; deleting
  a group terminates its instances without waiting for any lifecycle hook. Refused.
- ``AutoScalingRollingUpdate``: CloudFormation terminates old instances in batches, but it counts an
  instance held in ``Terminating:Wait`` as terminated and moves on, so every old instance can end up
  held at once and capacity drops. Allowed, with a warning.
- ``AutoScalingInstanceRefresh``: a changed launch template (or other refresh-triggering property)
  starts an instance refresh, which honours lifecycle hooks and waits for each held instance; the
  stack update waits for the refresh. Accepted.

``add_instance_refresh=True`` sets a launch-before-terminate refresh (``MinHealthyPercentage`` 100,
``MaxHealthyPercentage`` 110) on a group that has no replacing, rolling or refresh policy, so a held
instance never costs capacity. Groups given by name, or imported, are not CDK's to judge.

Sources: the CloudFormation Template Reference, "UpdatePolicy attribute" (AutoScalingInstanceRefresh
section: the properties that trigger a refresh, one refresh per group at a time, each stack-update
direction bounded by CloudFormation's 36-hour resource timeout), and aws-cdk-lib's
``UpdatePolicy.instance_refresh`` (2.263+), whose ``bakeTime`` is counted "after an instance refresh
completes successfully before CloudFormation considers the update successful": the update waits.
"""

from __future__ import annotations

from collections.abc import Sequence

import jsii
from aws_cdk import (
    Annotations,
    CfnAutoScalingInstanceRefresh,
    CfnAutoScalingInstanceRefreshPreferences,
    CfnUpdatePolicy,
)
from aws_cdk import aws_autoscaling as autoscaling
from constructs import Construct, IValidation

from busy_guard_infra.config import ConfigError

REFRESH_MIN_HEALTHY_PERCENTAGE = 100
"""Launch before terminate: no old instance leaves service before its replacement is healthy."""
REFRESH_MAX_HEALTHY_PERCENTAGE = 110
"""The least headroom that lets a launch-before-terminate refresh move at all: one extra instance per
ten (at least one). Each batch is that many instances, so a held instance costs time, never capacity."""
ROLLING_UPDATE_WARNING = "busy-guard:rolling-update"
REFRESH_ADDED_INFO = "busy-guard:instance-refresh-added"


def _l1(group: autoscaling.IAutoScalingGroup) -> autoscaling.CfnAutoScalingGroup | None:
    if not isinstance(group, autoscaling.AutoScalingGroup):
        return None  # imported (from_auto_scaling_group_name): its update policy lives elsewhere
    child = group.node.default_child
    return child if isinstance(child, autoscaling.CfnAutoScalingGroup) else None


def launch_before_terminate_refresh() -> CfnAutoScalingInstanceRefresh:
    return CfnAutoScalingInstanceRefresh(
        strategy="Rolling",
        preferences=CfnAutoScalingInstanceRefreshPreferences(
            min_healthy_percentage=REFRESH_MIN_HEALTHY_PERCENTAGE,
            max_healthy_percentage=REFRESH_MAX_HEALTHY_PERCENTAGE,
        ),
    )


def replacing_update_problem(group: autoscaling.IAutoScalingGroup) -> str | None:
    cfn = _l1(group)
    policy = cfn.cfn_options.update_policy if cfn is not None else None
    replacing = policy.auto_scaling_replacing_update if policy is not None else None
    if replacing is None or replacing.will_replace is False:
        return None
    return (
        f"Auto Scaling group {group.node.path} has UpdatePolicy AutoScalingReplacingUpdate: CloudFormation "
        "would delete the old group after creating the new one, and deleting a group terminates its "
        "instances without waiting for the busy-guard hook. Use update_policy=UpdatePolicy.instance_refresh("
        "min_healthy_percentage=100, max_healthy_percentage=110), or pass add_instance_refresh=True to "
        "BusyGuard for a group without an update policy."
    )


def judge_update_policies(
    scope: Construct, groups: Sequence[autoscaling.IAutoScalingGroup], *, add_instance_refresh: bool
) -> None:
    """Refuse, warn about, accept or (opt-in) set each group's update policy. A replacing update is
    checked again at synth, in case the policy is changed after the guard is built."""
    problems = [problem for group in groups if (problem := replacing_update_problem(group))]
    if problems:
        raise ConfigError(problems)
    for group in groups:
        cfn = _l1(group)
        if cfn is None:
            continue
        policy = cfn.cfn_options.update_policy
        rolling = policy.auto_scaling_rolling_update if policy is not None else None
        refresh = policy.auto_scaling_instance_refresh if policy is not None else None
        if rolling is not None:
            Annotations.of(group).add_warning_v2(
                ROLLING_UPDATE_WARNING,
                "UpdatePolicy AutoScalingRollingUpdate: CloudFormation won't wait for instances that "
                "busy-guard holds in Terminating:Wait. It counts them terminated and moves on, so every "
                "old instance can be held at once while their work runs. Prefer "
                "UpdatePolicy.instance_refresh (or BusyGuard's add_instance_refresh=True with no policy).",
            )
        elif refresh is None and add_instance_refresh:
            cfn.cfn_options.update_policy = CfnUpdatePolicy(
                auto_scaling_instance_refresh=launch_before_terminate_refresh(),
                auto_scaling_scheduled_action=(
                    policy.auto_scaling_scheduled_action if policy is not None else None
                ),
                code_deploy_lambda_alias_update=(
                    policy.code_deploy_lambda_alias_update if policy is not None else None
                ),
                enable_version_upgrade=policy.enable_version_upgrade if policy is not None else None,
                use_online_resharding=policy.use_online_resharding if policy is not None else None,
            )
            Annotations.of(group).add_info(
                f"{REFRESH_ADDED_INFO}: busy-guard set UpdatePolicy AutoScalingInstanceRefresh "
                f"(MinHealthyPercentage {REFRESH_MIN_HEALTHY_PERCENTAGE}, MaxHealthyPercentage "
                f"{REFRESH_MAX_HEALTHY_PERCENTAGE})"
            )
        group.node.add_validation(_ReplacingUpdateCheck(group))


@jsii.implements(IValidation)
class _ReplacingUpdateCheck:
    """Synth-time re-check: a replacing update set after ``BusyGuard`` was built is refused too."""

    def __init__(self, group: autoscaling.IAutoScalingGroup) -> None:
        self._group = group

    def validate(self) -> list[str]:
        problem = replacing_update_problem(self._group)
        return [problem] if problem else []
