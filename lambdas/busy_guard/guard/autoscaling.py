"""The guard's view of Auto Scaling: complete, heartbeat, read our hook, and list the instances
waiting on us (the groups' instances and their warm pools').

One retry layer: the client's (botocore standard mode, ``handler._AWS_CONFIG``). Nothing here loops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

from botocore.exceptions import BotoCoreError, ClientError

from busy_guard.guard.deadline import NO_DEADLINE, Deadline

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

# Waits a terminating hook of ours can be behind. Warmed:Pending:Wait is also where a *launch* hook
# holds a new warm-pool instance, so the tick only adopts it when our event already marked it, or
# when a heartbeat on our hook (a probe) is accepted.
ADOPTABLE_STATES = frozenset({"Terminating:Wait", "Warmed:Terminating:Wait"})
WARM_POOL_RETURN_STATE = "Warmed:Pending:Wait"
WAITING_STATES = ADOPTABLE_STATES | {WARM_POOL_RETURN_STATE}
IN_SERVICE = "InService"
NO_ACTIVE_ACTION = "No active Lifecycle Action found"
VALIDATION_ERROR = "ValidationError"
DESCRIBE_PAGE = 50  # AWS: DescribeAutoScalingGroups accepts at most 50 names a call


class GroupInstance(NamedTuple):
    asg: str
    lifecycle_state: str

    @property
    def waiting(self) -> bool:
        """In a wait a terminating hook of ours may be behind."""
        return self.lifecycle_state in WAITING_STATES

    @property
    def adoptable(self) -> bool:
        """Certainly a terminating wait: the tick may adopt it without an event."""
        return self.lifecycle_state in ADOPTABLE_STATES


class HookResult(StrEnum):
    DONE = "done"  # our call completed or heartbeat the action
    NOT_ACTIVE = "not_active"  # no action of ours is pending: someone else finished it
    GONE = "gone"  # the group or our hook no longer exists: nothing will ever be pending


@dataclass(frozen=True)
class HookFacts:
    """Our hook as Auto Scaling has it, which may differ from the stack's configuration."""

    heartbeat_timeout: int
    default_result: str


class AutoScalingUnavailableError(RuntimeError):
    """An Auto Scaling call failed after the client's retries; the message says why."""


class LifecycleHooks:
    def __init__(self, client: AutoScalingClient, hook_name: str) -> None:
        self.client = client
        self.hook_name = hook_name
        self._facts: dict[str, HookFacts | None] = {}  # per container: the hook rarely changes

    def complete(self, asg: str, instance_id: str, result: str) -> HookResult:
        return self._lifecycle_call(
            "CompleteLifecycleAction",
            asg,
            lambda: self.client.complete_lifecycle_action(
                AutoScalingGroupName=asg,
                LifecycleHookName=self.hook_name,
                InstanceId=instance_id,
                LifecycleActionResult=result,
            ),
        )

    def heartbeat(self, asg: str, instance_id: str) -> HookResult:
        return self._lifecycle_call(
            "RecordLifecycleActionHeartbeat",
            asg,
            lambda: self.client.record_lifecycle_action_heartbeat(
                AutoScalingGroupName=asg, LifecycleHookName=self.hook_name, InstanceId=instance_id
            ),
        )

    def hook_facts(self, asg: str, *, cached_only: bool = False) -> HookFacts | None:
        """Our hook's real HeartbeatTimeout and DefaultResult (None: no such hook or group), read
        once per container. ``cached_only`` never calls: the fast paths don't pay for it."""
        if asg in self._facts or cached_only:
            return self._facts.get(asg)
        hooks = self._describe_call(
            "DescribeLifecycleHooks",
            lambda: self.client.describe_lifecycle_hooks(
                AutoScalingGroupName=asg, LifecycleHookNames=[self.hook_name]
            ),
        )
        found = [h for h in hooks.get("LifecycleHooks", []) if h.get("LifecycleHookName") == self.hook_name]
        facts = (
            HookFacts(
                heartbeat_timeout=int(found[0].get("HeartbeatTimeout", 3600)),  # AWS's defaults
                default_result=str(found[0].get("DefaultResult", "ABANDON")),
            )
            if found
            else None
        )
        self._facts[asg] = facts
        return facts

    def waiting_instances(self, asg_names: Iterable[str]) -> dict[str, GroupInstance]:
        """Every instance of the named groups in a wait a terminating hook may be behind."""
        return {i: w for i, w in self.group_instances(asg_names).items() if w.waiting}

    def group_instances(
        self, asg_names: Iterable[str], deadline: Deadline = NO_DEADLINE
    ) -> dict[str, GroupInstance]:
        """Every instance of the named groups and of their warm pools, with its lifecycle state.

        One DescribeAutoScalingGroups call per 50 groups (per page), never a call per instance, and
        one DescribeWarmPool (per page) for each group that has a warm pool: DescribeAutoScalingGroups
        does not list warm-pool instances."""
        names = list(dict.fromkeys(asg_names))
        found: dict[str, GroupInstance] = {}
        pooled: list[str] = []
        for start in range(0, len(names), DESCRIBE_PAGE):
            kwargs: dict[str, Any] = {"AutoScalingGroupNames": names[start : start + DESCRIBE_PAGE]}
            for page in self._pages(
                "DescribeAutoScalingGroups", self.client.describe_auto_scaling_groups, kwargs, deadline
            ):
                for group in page.get("AutoScalingGroups", []):
                    _add(found, group["AutoScalingGroupName"], group.get("Instances", []))
                    if group.get("WarmPoolConfiguration"):
                        pooled.append(group["AutoScalingGroupName"])
        for asg in pooled:
            kwargs = {"AutoScalingGroupName": asg}
            for page in self._pages("DescribeWarmPool", self.client.describe_warm_pool, kwargs, deadline):
                _add(found, asg, page.get("Instances", []))
        return found

    def _pages(
        self, operation: str, call: Callable[..., Any], kwargs: dict[str, Any], deadline: Deadline
    ) -> Iterable[Any]:
        while True:
            deadline.check_call(operation)
            page = self._describe_call(operation, functools.partial(call, **kwargs))
            yield page
            token = page.get("NextToken")
            if not token:
                return
            kwargs = {**kwargs, "NextToken": token}

    def _describe_call(self, operation: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (ClientError, BotoCoreError) as error:
            raise AutoScalingUnavailableError(_describe(operation, error)) from error

    def _lifecycle_call(self, operation: str, asg: str, call: Callable[[], Any]) -> HookResult:
        try:
            call()
        except ClientError as error:
            info = error.response.get("Error", {})
            if info.get("Code") == VALIDATION_ERROR and NO_ACTIVE_ACTION in info.get("Message", ""):
                return HookResult.NOT_ACTIVE
            if info.get("Code") == VALIDATION_ERROR and self._group_or_hook_gone(asg):
                return HookResult.GONE
            raise AutoScalingUnavailableError(_describe(operation, error)) from error
        except BotoCoreError as error:
            raise AutoScalingUnavailableError(_describe(operation, error)) from error
        return HookResult.DONE

    def _group_or_hook_gone(self, asg: str) -> bool:
        """Any other ValidationError may mean the group or our hook was deleted: only a describe
        call that no longer finds it proves that (a failing describe proves nothing)."""
        try:
            groups = self.client.describe_auto_scaling_groups(AutoScalingGroupNames=[asg])
            if not groups.get("AutoScalingGroups"):
                return True
            self._facts.pop(asg, None)
            return self.hook_facts(asg) is None
        except (ClientError, BotoCoreError, AutoScalingUnavailableError):
            return False


def _add(found: dict[str, GroupInstance], asg: str, instances: Iterable[Any]) -> None:
    for instance in instances:
        found[instance["InstanceId"]] = GroupInstance(asg, instance.get("LifecycleState", ""))


def _describe(operation: str, error: Exception) -> str:
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        return f"Auto Scaling {operation} failed: {info.get('Code', '?')}: {info.get('Message', '')}"[:300]
    return f"Auto Scaling {operation} failed: {type(error).__name__}: {error}"[:300]
