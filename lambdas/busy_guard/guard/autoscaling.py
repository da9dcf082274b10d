"""The guard's view of Auto Scaling: complete, heartbeat, and list the instances waiting on us."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

# Waits a terminating hook of ours can be behind. Warmed:Pending:Wait is also where a *launch* hook
# holds a new warm-pool instance, so the tick only adopts it when our event already marked it.
ADOPTABLE_STATES = frozenset({"Terminating:Wait", "Warmed:Terminating:Wait"})
WARM_POOL_RETURN_STATE = "Warmed:Pending:Wait"
WAITING_STATES = ADOPTABLE_STATES | {WARM_POOL_RETURN_STATE}
IN_SERVICE = "InService"
NO_ACTIVE_ACTION = "No active Lifecycle Action found"
# Throttling and ResourceContention are the two Auto Scaling asks callers to retry with backoff.
RETRYABLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "ResourceContention",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
    }
)
DESCRIBE_PAGE = 50  # DescribeAutoScalingGroups accepts at most 50 names a call
T = TypeVar("T")


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


class AutoScalingUnavailableError(RuntimeError):
    """An Auto Scaling call failed after retries; the message says why."""


class LifecycleHooks:
    def __init__(
        self,
        client: AutoScalingClient,
        hook_name: str,
        *,
        attempts: int = 4,
        base_delay: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.hook_name = hook_name
        self._attempts = attempts
        self._base_delay = base_delay
        self._sleep = sleep

    def complete(self, asg: str, instance_id: str, result: str) -> HookResult:
        return self._lifecycle_call(
            "CompleteLifecycleAction",
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
            lambda: self.client.record_lifecycle_action_heartbeat(
                AutoScalingGroupName=asg, LifecycleHookName=self.hook_name, InstanceId=instance_id
            ),
        )

    def waiting_instances(self, asg_names: Iterable[str]) -> dict[str, GroupInstance]:
        """Every instance of the named groups in a wait a terminating hook may be behind."""
        return {i: w for i, w in self.group_instances(asg_names).items() if w.waiting}

    def group_instances(self, asg_names: Iterable[str]) -> dict[str, GroupInstance]:
        """Every instance of the named groups, with its lifecycle state.

        One DescribeAutoScalingGroups call per 50 groups (per page), never a call per instance.
        """
        names = list(dict.fromkeys(asg_names))
        found: dict[str, GroupInstance] = {}
        for start in range(0, len(names), DESCRIBE_PAGE):
            kwargs: dict[str, Any] = {"AutoScalingGroupNames": names[start : start + DESCRIBE_PAGE]}
            while True:
                page = self._describe_page(kwargs)
                for group in page.get("AutoScalingGroups", []):
                    for instance in group.get("Instances", []):
                        found[instance["InstanceId"]] = GroupInstance(
                            group["AutoScalingGroupName"], instance.get("LifecycleState", "")
                        )
                token = page.get("NextToken")
                if not token:
                    break
                kwargs = {**kwargs, "NextToken": token}
        return found

    def _describe_page(self, kwargs: dict[str, Any]) -> Any:
        try:
            return self._retrying(
                "DescribeAutoScalingGroups", lambda: self.client.describe_auto_scaling_groups(**kwargs)
            )
        except ClientError as error:
            raise AutoScalingUnavailableError(_describe("DescribeAutoScalingGroups", error)) from error

    def _lifecycle_call(self, operation: str, call: Callable[[], Any]) -> HookResult:
        try:
            self._retrying(operation, call)
        except ClientError as error:
            info = error.response.get("Error", {})
            if info.get("Code") == "ValidationError" and NO_ACTIVE_ACTION in info.get("Message", ""):
                return HookResult.NOT_ACTIVE
            raise AutoScalingUnavailableError(_describe(operation, error)) from error
        return HookResult.DONE

    def _retrying(self, operation: str, call: Callable[[], T]) -> T:
        for attempt in range(1, self._attempts + 1):
            try:
                return call()
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if attempt == self._attempts or not (code in RETRYABLE_CODES or status >= 500):
                    raise
            except BotoCoreError as error:
                if attempt == self._attempts:
                    raise AutoScalingUnavailableError(_describe(operation, error)) from error
            # Full jitter, so concurrent reconciles don't retry in lockstep.
            self._sleep(random.uniform(0, self._base_delay * 2 ** (attempt - 1)))  # noqa: S311
        raise AssertionError("unreachable")


def _describe(operation: str, error: Exception) -> str:
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        return f"Auto Scaling {operation} failed: {info.get('Code', '?')}: {info.get('Message', '')}"[:300]
    return f"Auto Scaling {operation} failed: {type(error).__name__}: {error}"[:300]
