"""An emulator of the terminating lifecycle hook's state machine, behind the real boto3 client.

moto implements Auto Scaling groups, lifecycle hooks and EC2, but not ``CompleteLifecycleAction``,
not ``RecordLifecycleActionHeartbeat`` and not the ``Terminating:Wait`` state. This module adds them
*behind* botocore, so the code under test keeps calling a real boto3 ``autoscaling`` client:

- ``before-send.auto-scaling`` (registered first, per HTTP attempt) answers the two lifecycle-action
  calls, and any injected fault, with an AWS query-protocol XML response. botocore then parses it,
  runs its retry handler on it and raises :class:`botocore.exceptions.ClientError` for a 4xx/5xx,
  exactly as it does for AWS. The diverted request's URL is pointed away from AWS so moto's own
  ``before-send`` stubber, which runs after ours, ignores it.
- ``after-call.auto-scaling`` rewrites the ``Describe*`` answers that moto produced: held instances
  report ``Terminating:Wait`` (``Warmed:Pending:Wait`` when bound for a warm pool), and
  ``DescribeLifecycleHooks`` gets the ``NotificationMetadata`` and ``GlobalTimeout`` moto drops.
- ``before-call.auto-scaling`` applies due timeouts first, so every answer reflects the clock.

Everything else (groups, hooks, instances, capacity) is moto's, read and changed through the
emulator's own client. When the last hook of a termination is done, the instance really leaves:
``TerminateInstanceInAutoScalingGroup`` (moto terminates the EC2 instance and launches no
replacement when the desired capacity is decremented), or ``DetachInstances`` + EC2
``StopInstances`` for a warm-pool return. A finished instance is gone from the group at once:
``Terminating:Proceed`` is not shown.

A warm-pool return waits in ``Warmed:Pending:Wait`` (AWS's documented state for a terminating hook
when the instance reuse policy returns it to the pool); the emulator lists it both in the group's
``Instances`` and in ``DescribeWarmPool`` (which of the two AWS lists it in is not documented), then
``Warmed:Stopped`` (or the pool's state) in ``DescribeWarmPool`` / ``DescribeAutoScalingInstances``.

``DeleteLifecycleHook`` completes the hook's pending actions with CONTINUE (AWS's documented rule for
terminating hooks); ``DeleteAutoScalingGroup`` ends its instances' terminations.

Not emulated: launching hooks (``Pending:Wait``); Auto Scaling choosing victims itself (scale-in,
instance refresh: call :meth:`LifecycleHookEmulator.terminate`); ``DesiredCapacity`` dropping at the
start of the wait rather than at its end; instance lifecycle policies
(``TerminateHookAbandon: retain``); SNS/SQS notification targets and the
``autoscaling:TEST_NOTIFICATION``; IAM. Error wording AWS does not document is the emulator's own
(see ``_find_locked``); "No active Lifecycle Action found with instance ID i-…" and
"… with token …" are AWS's.

Sandbox only: nothing outside ``busy_guard.sandbox`` imports this module, and it never imports moto.
"""

from __future__ import annotations

import functools
import io
import itertools
import threading
import time
import uuid
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

import boto3
from botocore.awsrequest import AWSResponse
from botocore.compat import HTTPHeaders
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_ec2 import EC2Client

__all__ = [
    "ABANDON",
    "CONTINUE",
    "TERMINATING",
    "ActionView",
    "CallStats",
    "Completion",
    "LifecycleHookEmulator",
    "TimelineEntry",
]

TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
CONTINUE = "CONTINUE"
ABANDON = "ABANDON"
RESULTS = (CONTINUE, ABANDON)
MAX_GLOBAL_TIMEOUT = 172_800  # 48 h
DETAIL_TYPE = "EC2 Instance-terminate Lifecycle Action"

COMPLETE = "CompleteLifecycleAction"
HEARTBEAT = "RecordLifecycleActionHeartbeat"
DESCRIBE_REFRESHES = "DescribeInstanceRefreshes"  # moto 5.2 does not implement instance refreshes

TERMINATING_WAIT = "Terminating:Wait"
WARMED_PENDING_WAIT = "Warmed:Pending:Wait"
TERMINATED = "Terminated"
IN_SERVICE = "InService"

_NS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
_DIVERTED_URL = "https://busy-guard-lifecycle-emulator.invalid/"
_PARAMS_KEY = "busy_guard_emulator_params"

# Codes the guard's fault tests use, with the status and message AWS answers them with.
_FAULT_DEFAULTS: dict[str, tuple[int, str]] = {
    "Throttling": (400, "Rate exceeded"),
    "ResourceContention": (
        500,
        "You already have a pending update to an Auto Scaling resource "
        "(for example, a group, instance, or load balancer).",
    ),
    "AccessDenied": (403, "User is not authorized to perform: autoscaling:{operation}"),
    "ServiceUnavailable": (503, "Service is unavailable"),
    "InternalFailure": (500, "An internal error occurred"),
    "ValidationError": (400, "Validation error"),
}


# --- what the emulator records ------------------------------------------------------------------
@dataclass(frozen=True)
class Completion:
    """One hook's wait ended with ``result``: by a ``CompleteLifecycleAction`` call (``by="guard"``,
    whoever made it) or by a timeout (``by="timeout"``, ``detail`` "heartbeat timeout" or
    "global timeout"). ``at`` is when AWS would have done it (a timeout's deadline, not when the
    emulator noticed)."""

    instance_id: str
    group_name: str
    hook_name: str
    result: str
    by: str
    at: float
    wait_seconds: float
    token: str
    detail: str = ""


@dataclass(frozen=True)
class TimelineEntry:
    """One line of the emulator's history, for assertions and the demo's timeline."""

    at: float
    instance_id: str
    # terminate, heartbeat, complete, timeout, skipped, terminated, warmed, relaunched, rejected, fault
    what: str
    detail: str = ""

    def __str__(self) -> str:
        when = datetime.fromtimestamp(self.at, UTC).strftime("%H:%M:%S")
        return f"{when} {self.instance_id:<20} {self.what:<10} {self.detail}".rstrip()


@dataclass
class CallStats:
    """Per operation, per HTTP attempt (botocore retries count): ``attempted`` reached the emulator,
    ``accepted`` succeeded, ``rejected`` got a ValidationError, ``faulted`` got an injected fault.
    Only the two lifecycle-action calls are accepted/rejected by the emulator; other operations
    only count ``attempted`` and ``faulted`` (moto answers the rest)."""

    attempted: int = 0
    accepted: int = 0
    rejected: int = 0
    faulted: int = 0


@dataclass(frozen=True)
class ActionView:
    """A pending lifecycle action (one hook's wait on one instance), as of the call."""

    instance_id: str
    group_name: str
    hook_name: str
    token: str
    lifecycle_state: str
    started_at: float
    heartbeat_deadline: float
    global_deadline: float
    heartbeats: int
    default_result: str
    origin: str | None
    destination: str | None


@dataclass
class _Wait:
    hook_name: str
    token: str
    heartbeat_timeout: int
    default_result: str
    heartbeat_deadline: float
    global_deadline: float
    heartbeats: int = 0
    result: str | None = None

    @property
    def deadline(self) -> float:
        return min(self.heartbeat_deadline, self.global_deadline)


@dataclass
class _Termination:
    instance_id: str
    group_name: str
    group_arn: str
    origin: str | None
    destination: str | None
    should_decrement: bool
    started_at: float
    details: dict[str, Any]
    waits: list[_Wait] = field(default_factory=list)
    finished: bool = False

    @property
    def to_warm_pool(self) -> bool:
        return self.destination == "WarmPool"

    @property
    def wait_state(self) -> str:
        return WARMED_PENDING_WAIT if self.to_warm_pool else TERMINATING_WAIT

    def active(self) -> list[_Wait]:
        return [w for w in self.waits if w.result is None]


@dataclass(frozen=True)
class _Fault:
    code: str
    message: str
    status: int
    client_number: int | None = None  # only this attached client's attempts; None: any


class _Body(io.BytesIO):
    """The ``raw`` of an :class:`AWSResponse`: botocore reads it through ``stream()``."""

    def stream(self, **_: Any) -> Iterator[bytes]:
        chunk = self.read()
        while chunk:
            yield chunk
            chunk = self.read()


class _Rejected(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- the emulator -------------------------------------------------------------------------------
class LifecycleHookEmulator:
    """The terminating lifecycle hook's state machine, answered through botocore's event hooks.

    ``autoscaling`` is the emulator's own client on moto (decorator or server mode): it reads the
    hooks and makes the real moto calls that finish a termination. It need not be attached.
    ``clock`` gives epoch seconds; timeouts are applied lazily against it on every call.
    """

    def __init__(
        self,
        autoscaling: AutoScalingClient,
        *,
        clock: Callable[[], float] = time.time,
        region: str | None = None,
        account_id: str | None = None,
        ec2: EC2Client | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        warm_returns_in_group: bool = True,
    ) -> None:
        self._asg = autoscaling
        # Where a warm-pool return in Warmed:Pending:Wait is listed besides DescribeWarmPool: AWS
        # does not document whether DescribeAutoScalingGroups shows it, so both are emulated.
        self.warm_returns_in_group = warm_returns_in_group
        self._clock = clock
        self.region: str = region or autoscaling.meta.region_name
        self._account_id = account_id
        self._ec2 = ec2
        self.on_event = on_event
        self._lock = threading.RLock()
        self._local = threading.local()
        self._uid = f"busy-guard-lifecycle-emulator-{uuid.uuid4()}"
        self._current: dict[str, _Termination] = {}  # instance id -> termination in progress
        self._by_token: dict[str, tuple[_Termination, _Wait]] = {}
        self._history: list[_Termination] = []
        self._status: dict[str, str] = {}  # instance id -> last lifecycle state the emulator set
        self._warmed: dict[str, _Termination] = {}  # instance id -> its return to the warm pool
        self._metadata: dict[tuple[str, str], str] = {}  # (group, hook) -> NotificationMetadata
        self._completions: list[Completion] = []
        self._timeline: list[TimelineEntry] = []
        self._events: list[dict[str, Any]] = []
        self._stats: defaultdict[str, CallStats] = defaultdict(CallStats)
        self._faults: defaultdict[str, deque[_Fault]] = defaultdict(deque)
        # Each attached client's number, which its before-send handler carries: a fault may be
        # aimed at one client (the code under test's) and never hit another (a test's own reads).
        self._client_numbers: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._numbering = itertools.count(1)
        self._refreshes: dict[str, list[dict[str, Any]]] = {}  # group -> its instance refreshes

    # --- wiring ---------------------------------------------------------------------------------
    def attach(self, client: AutoScalingClient) -> AutoScalingClient:
        """Serve the lifecycle-action calls and the ``Terminating:Wait`` view on ``client``.

        Works on any boto3 ``autoscaling`` client, including ones the code under test creates
        itself; attaching twice is harmless. Returns ``client``."""
        service = self._service_id(client)
        events = client.meta.events
        with self._lock:
            number = self._client_numbers.setdefault(client, next(self._numbering))
        events.register_first(f"before-call.{service}", self._before_call, unique_id=f"{self._uid}-call")
        # botocore takes the first non-None answer of a before-send handler as the HTTP response.
        before_send = cast("Callable[..., None]", functools.partial(self._before_send, client_number=number))
        events.register_first(f"before-send.{service}", before_send, unique_id=f"{self._uid}-send")
        events.register(f"after-call.{service}", self._after_call, unique_id=f"{self._uid}-after")
        return client

    def detach(self, client: AutoScalingClient) -> None:
        service = self._service_id(client)
        events = client.meta.events
        events.unregister(f"before-call.{service}", unique_id=f"{self._uid}-call")
        events.unregister(f"before-send.{service}", unique_id=f"{self._uid}-send")
        events.unregister(f"after-call.{service}", unique_id=f"{self._uid}-after")

    @staticmethod
    def _service_id(client: AutoScalingClient) -> str:
        service: str = client.meta.service_model.service_id.hyphenize()
        if service != "auto-scaling":
            raise ValueError(f"not an autoscaling client: {service}")
        return service

    # --- starting and ending terminations --------------------------------------------------------
    def terminate(
        self,
        instance_id: str,
        *,
        origin: str | None = "AutoScalingGroup",
        destination: str | None = "EC2",
        should_decrement: bool = True,
    ) -> list[dict[str, Any]]:
        """Start terminating ``instance_id`` as Auto Scaling would; return the EventBridge events.

        One event per terminating hook on the instance's group, all waits running at once. With no
        terminating hook the instance leaves immediately and the list is empty. ``destination``
        ``"WarmPool"`` returns the instance to the warm pool instead (same id, see
        :meth:`relaunch`). ``origin``/``destination`` ``None`` leaves the fields out of the event,
        as groups without a warm pool did before AWS added them. ``should_decrement=False`` lets
        moto launch a replacement when the instance leaves (like a health replacement)."""
        with self._lock:
            now = self._clock()
            self._apply_timeouts_locked(now)
            if instance_id in self._current:
                raise ValueError(f"{instance_id} is already in {self._current[instance_id].wait_state}")
            with self._internal():
                found = self._asg.describe_auto_scaling_instances(InstanceIds=[instance_id])
                if not found["AutoScalingInstances"]:
                    raise ValueError(f"{instance_id} is not in any Auto Scaling group")
                details: dict[str, Any] = dict(found["AutoScalingInstances"][0])
                group_name = str(details["AutoScalingGroupName"])
                group = self._asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group_name])
                group_arn = group["AutoScalingGroups"][0].get("AutoScalingGroupARN", "")
                hooks = self._asg.describe_lifecycle_hooks(AutoScalingGroupName=group_name)
            termination = _Termination(
                instance_id=instance_id,
                group_name=group_name,
                group_arn=group_arn,
                origin=origin,
                destination=destination,
                should_decrement=should_decrement,
                started_at=now,
                details=details,
            )
            self._history.append(termination)
            events: list[dict[str, Any]] = []
            for hook in hooks["LifecycleHooks"]:
                if hook.get("LifecycleTransition") != TERMINATING:
                    continue
                timeout = int(hook.get("HeartbeatTimeout", 3600))
                wait = _Wait(
                    hook_name=hook["LifecycleHookName"],
                    token=str(uuid.uuid4()),
                    heartbeat_timeout=timeout,
                    default_result=hook.get("DefaultResult", ABANDON),
                    heartbeat_deadline=now + timeout,
                    global_deadline=now + min(100 * timeout, MAX_GLOBAL_TIMEOUT),
                )
                termination.waits.append(wait)
                self._by_token[wait.token] = (termination, wait)
                events.append(self._event(termination, wait, now))
            if termination.waits:
                self._current[instance_id] = termination
                self._status[instance_id] = termination.wait_state
                hooks_named = ", ".join(w.hook_name for w in termination.waits)
                self._note(now, instance_id, "terminate", f"{termination.wait_state} ({hooks_named})")
            else:
                self._note(now, instance_id, "terminate", "no terminating hook")
                self._finish_locked(termination, now)
            self._events.extend(events)
        if self.on_event is not None:
            for event in events:
                self.on_event(event)
        return events

    def instance_refresh(
        self,
        group_name: str,
        *,
        status: str = "InProgress",
        percent_complete: int = 0,
        instances_to_update: int = 0,
        status_reason: str = "",
    ) -> str:
        """Record an instance refresh of ``group_name`` (newest first in ``DescribeInstanceRefreshes``,
        which the emulator answers: moto has no instance refreshes). Its terminations are still
        started with :meth:`terminate`, as Auto Scaling would pick them. Returns its id."""
        with self._lock:
            refresh_id = str(uuid.uuid4())
            self._refreshes.setdefault(group_name, []).insert(
                0,
                {
                    "InstanceRefreshId": refresh_id,
                    "AutoScalingGroupName": group_name,
                    "Status": status,
                    "StatusReason": status_reason,
                    "StartTime": self._clock(),
                    "PercentageComplete": percent_complete,
                    "InstancesToUpdate": instances_to_update,
                },
            )
            return refresh_id

    def _refreshes_xml(self, group_name: str) -> str:
        members = []
        for refresh in self._refreshes.get(group_name, []):
            fields = []
            for key, raw in refresh.items():
                text = (
                    datetime.fromtimestamp(raw, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                    if key == "StartTime"
                    else str(raw)
                )
                if text:
                    fields.append(f"<{key}>{escape(text)}</{key}>")
            members.append(f"<member>{''.join(fields)}</member>")
        operation = DESCRIBE_REFRESHES
        return (
            f'<{operation}Response xmlns="{_NS}"><{operation}Result><InstanceRefreshes>{"".join(members)}'
            f"</InstanceRefreshes></{operation}Result>"
            f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></{operation}Response>"
        )

    def relaunch(self, instance_id: str) -> None:
        """Bring a warmed instance back into its group, InService, with the same id."""
        with self._lock:
            now = self._clock()
            self._apply_timeouts_locked(now)
            termination = self._warmed.get(instance_id)
            if termination is None:
                raise ValueError(f"{instance_id} is not in a warm pool")
            with self._internal():
                self._asg.attach_instances(
                    AutoScalingGroupName=termination.group_name, InstanceIds=[instance_id]
                )
                if self._status.get(instance_id, "").endswith(("Stopped", "Hibernated")):
                    self._ec2_client().start_instances(InstanceIds=[instance_id])
            del self._warmed[instance_id]
            self._status[instance_id] = IN_SERVICE
            self._note(now, instance_id, "relaunched", f"back in {termination.group_name}")

    def apply_timeouts(self) -> list[Completion]:
        """Apply every heartbeat and global timeout due at the clock's time; return what ended.

        Also done implicitly before every call through an attached client and by every public
        method, so calling this is only needed to drive the timeline (the demo's ticks)."""
        with self._lock:
            return self._apply_timeouts_locked(self._clock())

    # --- fault injection ------------------------------------------------------------------------
    def fail_next(
        self,
        operation: str,
        code: str = "Throttling",
        message: str | None = None,
        *,
        status: int | None = None,
        count: int = 1,
        client: AutoScalingClient | None = None,
    ) -> None:
        """Answer the next ``count`` HTTP attempts of ``operation`` (any autoscaling operation, on
        attached clients) with an AWS-shaped error. Each botocore retry consumes one, so a
        retryable code (Throttling, 5xx) is retried by the client's retry mode as against AWS.

        ``client`` (attached) aims the faults at that client alone: the code under test's calls
        fail while a test's own reads through another attached client never see them."""
        default_status, default_message = _FAULT_DEFAULTS.get(code, (400, code))
        with self._lock:
            number = None
            if client is not None:
                number = self._client_numbers.get(client)
                if number is None:
                    raise ValueError("fail_next(client=...) needs a client attached to this emulator")
            fault = _Fault(
                code=code,
                message=(message or default_message).format(operation=operation),
                status=status or default_status,
                client_number=number,
            )
            self._faults[operation].extend([fault] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # --- what happened --------------------------------------------------------------------------
    def state(self, instance_id: str) -> str | None:
        """``Terminating:Wait``, ``Warmed:Pending:Wait``, ``Terminated``, ``Warmed:Stopped``,
        ``InService`` …; for an instance the emulator never touched, moto's lifecycle state;
        ``None`` for an instance in no group."""
        with self._lock:
            self._apply_timeouts_locked(self._clock())
            known = self._status.get(instance_id)
            if known is not None and known != IN_SERVICE:
                return known
            with self._internal():
                found = self._asg.describe_auto_scaling_instances(InstanceIds=[instance_id])
            rows = found["AutoScalingInstances"]
            return rows[0]["LifecycleState"] if rows else known

    def actions(self, instance_id: str | None = None) -> list[ActionView]:
        """The pending lifecycle actions (all, or one instance's), with their tokens and deadlines."""
        with self._lock:
            self._apply_timeouts_locked(self._clock())
            return [
                self._view(t, w)
                for t in self._current.values()
                if instance_id in (None, t.instance_id)
                for w in t.active()
            ]

    def completions(self, instance_id: str | None = None, *, by: str | None = None) -> list[Completion]:
        with self._lock:
            return [
                c for c in self._completions if instance_id in (None, c.instance_id) and by in (None, c.by)
            ]

    def heartbeats(self, instance_id: str) -> int:
        """Heartbeats accepted for ``instance_id`` over all its terminations and hooks."""
        with self._lock:
            return sum(w.heartbeats for t in self._history if t.instance_id == instance_id for w in t.waits)

    def calls(self, operation: str) -> CallStats:
        with self._lock:
            return replace(self._stats[operation])

    def timeline(self) -> list[TimelineEntry]:
        with self._lock:
            return list(self._timeline)

    def events(self) -> list[dict[str, Any]]:
        """Every EventBridge event :meth:`terminate` produced, oldest first."""
        with self._lock:
            return list(self._events)

    # --- botocore handlers ----------------------------------------------------------------------
    def _before_call(self, params: Mapping[str, Any], context: dict[str, Any], **_: Any) -> None:
        if self._is_internal():
            return
        context[_PARAMS_KEY] = _flat_params(params.get("body"))
        with self._lock:
            self._apply_timeouts_locked(self._clock())

    def _before_send(
        self, request: Any, event_name: str, client_number: int | None = None, **_: Any
    ) -> AWSResponse | None:
        if self._is_internal():
            return None
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            now = self._clock()
            self._apply_timeouts_locked(now)
            stats = self._stats[operation]
            stats.attempted += 1
            fault = self._take_fault(operation, client_number)
            if fault is not None:
                stats.faulted += 1
                self._note(now, "-", "fault", f"{operation}: {fault.status} {fault.code}")
                status, body = fault.status, _error_xml(fault.code, fault.message, fault.status)
            elif operation in (COMPLETE, HEARTBEAT):
                params = _flat_params(request.body)
                try:
                    if operation == COMPLETE:
                        self._complete_locked(params, now)
                    else:
                        self._heartbeat_locked(params, now)
                except _Rejected as rejected:
                    stats.rejected += 1
                    who = params.get("InstanceId") or params.get("LifecycleActionToken", "-")
                    self._note(now, who, "rejected", f"{operation}: {rejected.message}")
                    status, body = 400, _error_xml("ValidationError", rejected.message, 400)
                else:
                    stats.accepted += 1
                    status, body = 200, _success_xml(operation)
            elif operation == DESCRIBE_REFRESHES:
                params = _flat_params(request.body)
                stats.accepted += 1
                status, body = 200, self._refreshes_xml(params.get("AutoScalingGroupName", ""))
            else:
                return None  # moto answers
        # Keep moto's before-send stubber (it runs after us) from executing the call as well.
        request.url = _DIVERTED_URL
        return _response(status, body)

    def _take_fault(self, operation: str, client_number: int | None) -> _Fault | None:
        """The first pending fault of ``operation`` aimed at this client (or at any), taken."""
        pending = self._faults.get(operation)
        for index, fault in enumerate(pending or ()):
            if fault.client_number in (None, client_number):
                assert pending is not None
                del pending[index]
                return fault
        return None

    def _after_call(
        self, http_response: Any, parsed: dict[str, Any], model: Any, context: Mapping[str, Any], **_: Any
    ) -> None:
        if self._is_internal() or http_response is None or http_response.status_code >= 300:
            return
        params: dict[str, str] = context.get(_PARAMS_KEY, {})
        operation = model.name
        with self._lock:
            if operation == "DescribeAutoScalingGroups":
                for group in parsed.get("AutoScalingGroups", []):
                    group["Instances"] = self._overlay(
                        group.get("Instances", []), hide_warm_returns=not self.warm_returns_in_group
                    )
            elif operation == "DescribeAutoScalingInstances":
                rows = self._overlay(parsed.get("AutoScalingInstances", []))
                if not parsed.get("NextToken"):
                    wanted = _members(params, "InstanceIds")
                    listed = {row["InstanceId"] for row in rows}
                    for instance_id, termination in self._warmed.items():
                        if instance_id not in listed and (not wanted or instance_id in wanted):
                            rows.append(self._warm_row(termination, with_group=True))
                parsed["AutoScalingInstances"] = rows
            elif operation == "DescribeWarmPool" and not parsed.get("NextToken"):
                group_name = params.get("AutoScalingGroupName")
                instances = parsed.setdefault("Instances", [])
                returning = [t for t in self._current.values() if t.to_warm_pool]
                for termination in [*returning, *self._warmed.values()]:
                    if termination.group_name == group_name:
                        instances.append(self._warm_row(termination, with_group=False))
            elif operation == "DescribeLifecycleHooks":
                for hook in parsed.get("LifecycleHooks", []):
                    timeout = int(hook.get("HeartbeatTimeout", 3600))
                    hook["GlobalTimeout"] = min(100 * timeout, MAX_GLOBAL_TIMEOUT)
                    key = (hook.get("AutoScalingGroupName", ""), hook.get("LifecycleHookName", ""))
                    if key in self._metadata:
                        hook["NotificationMetadata"] = self._metadata[key]
            elif operation == "PutLifecycleHook" and "NotificationMetadata" in params:
                key = (params.get("AutoScalingGroupName", ""), params.get("LifecycleHookName", ""))
                self._metadata[key] = params["NotificationMetadata"]
            elif operation == "DeleteLifecycleHook":
                self._hook_deleted_locked(
                    params.get("AutoScalingGroupName", ""), params.get("LifecycleHookName", "")
                )
            elif operation == "DeleteAutoScalingGroup":
                self._group_deleted_locked(params.get("AutoScalingGroupName", ""))

    def _hook_deleted_locked(self, group_name: str, hook_name: str) -> None:
        """AWS: deleting a hook first completes its outstanding actions, CONTINUE for terminating."""
        now = self._clock()
        for termination in list(self._current.values()):
            for wait in termination.active():
                if termination.group_name == group_name and wait.hook_name == hook_name:
                    self._end_locked(termination, wait, CONTINUE, by="deleted", at=now, detail="hook deleted")

    def _group_deleted_locked(self, group_name: str) -> None:
        """A (force-)deleted group's instances are gone, and no action of it is pending any more."""
        now = self._clock()
        for instance_id, termination in list(self._current.items()):
            if termination.group_name != group_name:
                continue
            for wait in termination.active():
                wait.result = CONTINUE
                self._by_token.pop(wait.token, None)
            termination.finished = True
            del self._current[instance_id]
            self._status[instance_id] = TERMINATED
            self._note(now, instance_id, "terminated", f"group {group_name} deleted")

    # --- the state machine ----------------------------------------------------------------------
    def _find_locked(self, params: Mapping[str, str]) -> tuple[_Termination, _Wait]:
        """The active action a Complete/Heartbeat call names, or the ValidationError AWS answers.

        The two "No active Lifecycle Action found with ..." messages are AWS's. The wording for a
        missing group and for neither token nor instance id is the emulator's (AWS's is not
        documented); the code, ValidationError, is the same."""
        group_name = params.get("AutoScalingGroupName", "")
        hook_name = params.get("LifecycleHookName", "")
        token = params.get("LifecycleActionToken", "")
        instance_id = params.get("InstanceId", "")
        if not token and not instance_id:
            raise _Rejected("Either LifecycleActionToken or InstanceId must be specified")
        candidates: list[tuple[_Termination, _Wait]] = []
        if token:
            if token in self._by_token:
                candidates.append(self._by_token[token])
        elif instance_id in self._current:
            termination = self._current[instance_id]
            candidates.extend((termination, w) for w in termination.waits)
        for termination, wait in candidates:
            if (
                wait.result is None
                and termination.group_name == group_name
                and wait.hook_name == hook_name
                and (not instance_id or termination.instance_id == instance_id)
            ):
                return termination, wait
        if not self._group_exists(group_name):
            raise _Rejected(f"AutoScalingGroup name not found - AutoScalingGroup '{group_name}' not found")
        if token:
            raise _Rejected(f"No active Lifecycle Action found with token {token}")
        raise _Rejected(f"No active Lifecycle Action found with instance ID {instance_id}")

    def _complete_locked(self, params: Mapping[str, str], now: float) -> None:
        result = params.get("LifecycleActionResult", "")
        if result not in RESULTS:
            raise _Rejected(f"LifecycleActionResult must be {CONTINUE} or {ABANDON}, not '{result}'")
        termination, wait = self._find_locked(params)
        self._end_locked(termination, wait, result, by="guard", at=now)

    def _heartbeat_locked(self, params: Mapping[str, str], now: float) -> None:
        termination, wait = self._find_locked(params)
        wait.heartbeats += 1
        wait.heartbeat_deadline = min(now + wait.heartbeat_timeout, wait.global_deadline)
        left = wait.heartbeat_deadline - now
        self._note(now, termination.instance_id, "heartbeat", f"{wait.hook_name}: {left:.0f}s left")

    def _apply_timeouts_locked(self, now: float) -> list[Completion]:
        """End every wait whose deadline has passed with its hook's DefaultResult, oldest first."""
        due = sorted(
            ((w.deadline, t, w) for t in self._current.values() for w in t.active() if w.deadline <= now),
            key=lambda item: item[0],
        )
        ended: list[Completion] = []
        for deadline, termination, wait in due:
            if wait.result is not None:  # an earlier ABANDON in the same termination ended it
                continue
            which = (
                "global timeout" if wait.global_deadline <= wait.heartbeat_deadline else "heartbeat timeout"
            )
            ended.append(
                self._end_locked(
                    termination, wait, wait.default_result, by="timeout", at=deadline, detail=which
                )
            )
        return ended

    def _end_locked(
        self, termination: _Termination, wait: _Wait, result: str, *, by: str, at: float, detail: str = ""
    ) -> Completion:
        wait.result = result
        self._by_token.pop(wait.token, None)
        completion = Completion(
            instance_id=termination.instance_id,
            group_name=termination.group_name,
            hook_name=wait.hook_name,
            result=result,
            by=by,
            at=at,
            wait_seconds=at - termination.started_at,
            token=wait.token,
            detail=detail,
        )
        self._completions.append(completion)
        what = "complete" if by == "guard" else "timeout"
        self._note(at, termination.instance_id, what, f"{wait.hook_name}: {result} {detail}".rstrip())
        if result == ABANDON:
            for other in termination.active():  # ABANDON ends the termination's other waits at once
                other.result = ABANDON
                self._by_token.pop(other.token, None)
                self._note(at, termination.instance_id, "skipped", f"{other.hook_name}: abandoned")
        if not termination.active():
            self._finish_locked(termination, at)
        return completion

    def _finish_locked(self, termination: _Termination, at: float) -> None:
        """The instance really leaves: moto terminates it, or it goes to the warm pool."""
        termination.finished = True
        instance_id = termination.instance_id
        if self._current.get(instance_id) is termination:
            del self._current[instance_id]
        with self._internal():
            still_in_group = bool(
                self._asg.describe_auto_scaling_instances(InstanceIds=[instance_id])["AutoScalingInstances"]
            )
            try:
                if termination.to_warm_pool:
                    pool_state = self._pool_state(termination.group_name)
                    if still_in_group:
                        self._asg.detach_instances(
                            AutoScalingGroupName=termination.group_name,
                            InstanceIds=[instance_id],
                            ShouldDecrementDesiredCapacity=termination.should_decrement,
                        )
                    if pool_state != "Running":
                        self._ec2_client().stop_instances(InstanceIds=[instance_id])
                    self._status[instance_id] = f"Warmed:{pool_state}"
                    self._warmed[instance_id] = termination
                    self._note(at, instance_id, "warmed", f"Warmed:{pool_state} in {termination.group_name}")
                    return
                if still_in_group:
                    self._asg.terminate_instance_in_auto_scaling_group(
                        InstanceId=instance_id, ShouldDecrementDesiredCapacity=termination.should_decrement
                    )
            except ClientError as error:  # moto refused: record it, the emulated state still moves on
                self._note(at, instance_id, "error", str(error))
        self._status[instance_id] = TERMINATED
        self._note(at, instance_id, "terminated", f"left {termination.group_name}")

    # --- helpers --------------------------------------------------------------------------------
    def _overlay(
        self, rows: list[dict[str, Any]], *, hide_warm_returns: bool = False
    ) -> list[dict[str, Any]]:
        kept = []
        for row in rows:
            termination = self._current.get(row.get("InstanceId", ""))
            if termination is not None and termination.to_warm_pool and hide_warm_returns:
                continue  # listed only by DescribeWarmPool
            if termination is not None:
                row["LifecycleState"] = termination.wait_state
            elif self._status.get(row.get("InstanceId", ""), IN_SERVICE) != IN_SERVICE:
                continue  # finished by the emulator: gone from the group
            kept.append(row)
        return kept

    def _warm_row(self, termination: _Termination, *, with_group: bool) -> dict[str, Any]:
        row = {
            k: v
            for k, v in termination.details.items()
            if with_group or k not in ("AutoScalingGroupName", "ProtectedFromScaleIn")
        }
        row["LifecycleState"] = self._status.get(termination.instance_id, "Warmed:Stopped")
        return row

    def _view(self, termination: _Termination, wait: _Wait) -> ActionView:
        return ActionView(
            instance_id=termination.instance_id,
            group_name=termination.group_name,
            hook_name=wait.hook_name,
            token=wait.token,
            lifecycle_state=termination.wait_state,
            started_at=termination.started_at,
            heartbeat_deadline=wait.heartbeat_deadline,
            global_deadline=wait.global_deadline,
            heartbeats=wait.heartbeats,
            default_result=wait.default_result,
            origin=termination.origin,
            destination=termination.destination,
        )

    def _event(self, termination: _Termination, wait: _Wait, now: float) -> dict[str, Any]:
        arn_parts = termination.group_arn.split(":")
        account = self._account_id or (arn_parts[4] if len(arn_parts) > 4 else "123456789012")
        detail: dict[str, Any] = {
            "LifecycleActionToken": wait.token,
            "AutoScalingGroupName": termination.group_name,
            "LifecycleHookName": wait.hook_name,
            "EC2InstanceId": termination.instance_id,
            "LifecycleTransition": TERMINATING,
        }
        metadata = self._metadata.get((termination.group_name, wait.hook_name))
        if metadata is not None:
            detail["NotificationMetadata"] = metadata
        if termination.origin is not None:
            detail["Origin"] = termination.origin
        if termination.destination is not None:
            detail["Destination"] = termination.destination
        return {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": DETAIL_TYPE,
            "source": "aws.autoscaling",
            "account": account,
            "time": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self.region,
            "resources": [termination.group_arn],
            "detail": detail,
        }

    def _group_exists(self, group_name: str) -> bool:
        with self._internal():
            found = self._asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group_name])
        return bool(found["AutoScalingGroups"])

    def _pool_state(self, group_name: str) -> str:
        try:
            pool = self._asg.describe_warm_pool(AutoScalingGroupName=group_name)
        except ClientError:
            return "Stopped"
        return str((pool.get("WarmPoolConfiguration") or {}).get("PoolState") or "Stopped")

    def _ec2_client(self) -> EC2Client:
        if self._ec2 is None:
            endpoint = self._asg.meta.endpoint_url
            custom = None if "amazonaws.com" in endpoint else endpoint  # moto server mode
            self._ec2 = boto3.client("ec2", region_name=self.region, endpoint_url=custom)
        return self._ec2

    def _note(self, at: float, instance_id: str, what: str, detail: str = "") -> None:
        self._timeline.append(TimelineEntry(at=at, instance_id=instance_id, what=what, detail=detail))

    @contextmanager
    def _internal(self) -> Iterator[None]:
        """The emulator's own calls to moto: no overlay, no faults, even on an attached client."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth

    def _is_internal(self) -> bool:
        return bool(getattr(self._local, "depth", 0))


# --- AWS query-protocol responses ---------------------------------------------------------------
def _flat_params(body: Any) -> dict[str, str]:
    """A query-protocol request body (the dict before-call sees, or the urlencoded string)."""
    if isinstance(body, Mapping):
        return {str(k): str(v) for k, v in body.items()}
    if isinstance(body, bytes):
        body = body.decode("utf-8")
    if not isinstance(body, str):
        return {}
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _members(params: Mapping[str, str], name: str) -> set[str]:
    prefix = f"{name}.member."
    return {v for k, v in params.items() if k.startswith(prefix)}


def _success_xml(operation: str) -> str:
    return (
        f'<{operation}Response xmlns="{_NS}"><{operation}Result/>'
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
        f"</{operation}Response>"
    )


def _error_xml(code: str, message: str, status: int) -> str:
    kind = "Receiver" if status >= 500 else "Sender"
    return (
        f'<ErrorResponse xmlns="{_NS}"><Error><Type>{kind}</Type><Code>{escape(code)}</Code>'
        f"<Message>{escape(message)}</Message></Error><RequestId>{uuid.uuid4()}</RequestId>"
        f"</ErrorResponse>"
    )


def _response(status: int, body: str) -> AWSResponse:
    data = body.encode("utf-8")
    headers = HTTPHeaders()
    headers["Content-Type"] = "text/xml"
    headers["Content-Length"] = str(len(data))
    headers["Date"] = formatdate(usegmt=True)
    return AWSResponse(_DIVERTED_URL, status, headers, _Body(data))
