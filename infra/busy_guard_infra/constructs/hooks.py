"""The terminating lifecycle hook on each guarded Auto Scaling group."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from aws_cdk import Duration
from aws_cdk import aws_autoscaling as autoscaling
from constructs import Construct, IConstruct

from busy_guard_infra.config import GuardSettings
from busy_guard_infra.constants import TERMINATING_TRANSITION


def _construct_id(group_name: str) -> str:
    """A stable construct id per group name: reordering the names never replaces a hook."""
    readable = re.sub(r"[^A-Za-z0-9]", "", group_name)[:48]
    digest = hashlib.sha256(group_name.encode()).hexdigest()[:8]
    return f"Hook{readable}{digest}"


class GuardedGroupHooks(Construct):
    """An ``autoscaling:EC2_INSTANCE_TERMINATING`` hook with the guard's name on each group.

    No notification target: Auto Scaling sends every lifecycle action to EventBridge anyway, where the
    guard's rule picks it up. Groups given by name (created outside this app) get a
    ``CfnLifecycleHook`` on that name; ``AutoScalingGroup`` objects get the L2 ``LifecycleHook``,
    created in this construct's scope so that the hook can depend on the guard without a dependency
    cycle when the group lives in another stack.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: GuardSettings,
        group_names: Sequence[str] = (),
        groups: Sequence[autoscaling.IAutoScalingGroup] = (),
    ) -> None:
        super().__init__(scope, construct_id)
        self.hooks: list[IConstruct] = []
        for name in group_names:
            self.hooks.append(
                autoscaling.CfnLifecycleHook(
                    self,
                    _construct_id(name),
                    auto_scaling_group_name=name,
                    lifecycle_hook_name=settings.hook_name,
                    lifecycle_transition=TERMINATING_TRANSITION,
                    heartbeat_timeout=settings.heartbeat_timeout_seconds,
                    default_result=settings.default_result,
                )
            )
        for group in groups:
            self.hooks.append(
                autoscaling.LifecycleHook(
                    self,
                    _construct_id(group.node.path),
                    auto_scaling_group=group,
                    lifecycle_hook_name=settings.hook_name,
                    lifecycle_transition=autoscaling.LifecycleTransition.INSTANCE_TERMINATING,
                    heartbeat_timeout=Duration.seconds(settings.heartbeat_timeout_seconds),
                    default_result=autoscaling.DefaultResult(settings.default_result),
                )
            )

    def depend_on(self, *targets: IConstruct) -> None:
        """Create the hooks only after what completes them exists, and delete them first."""
        for hook in self.hooks:
            for target in targets:
                hook.node.add_dependency(target)
