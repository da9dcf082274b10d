"""A canned AWS behind botocore, for the guard's own cost without moto's.

moto is a faithful but slow server: serializing a 1,000-instance DescribeAutoScalingGroups answer
takes it most of a second, and it serves one request at a time. To see what the guard itself costs
(botocore serializing, signing and parsing, plus the guard's own Python) and what concurrency does
against a server that answers in parallel, this module answers the guard's seven operations from a
dict, in the ``before-send`` hook, with AWS-shaped bodies: the guard's real clients, real retries and
real parsing, no HTTP. An optional sleep per answer models the network round trip.

Not covered: the HTTP/TLS work of a real connection (a few hundred microseconds of CPU per request on
a reused connection, more for a new one), and AWS's own service time.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

import boto3
from botocore.awsrequest import AWSResponse
from botocore.compat import HTTPHeaders

from busy_guard import schema
from busy_guard.guard.config import GuardConfig
from busy_guard.guard.handler import build_guard
from busy_guard.guard.reconcile import Guard
from tests.bench import _support

REGION = "us-east-1"
ACCOUNT = "123456789012"
TABLE = "busy_guard.instance_busy"
HOOK = "busy-guard"
_NS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


class FakeAws:
    """One group of ``size`` instances, all in ``Terminating:Wait``; each busy (a live lease) or idle."""

    def __init__(self, group: str, size: int, *, busy: bool, now: float, latency: float = 0.0) -> None:
        self.group = group
        self.busy = busy
        self.latency = latency
        self.ids = [f"i-{n:017x}" for n in range(0x1000, 0x1000 + size)]
        self._lock = threading.Lock()
        self.items: dict[str, dict[str, Any]] = {}
        if busy:
            for item in _support.busy_items(self.ids, now):
                self.items[item[schema.INSTANCE_ID]["S"]] = item
        self._describe = self._describe_xml().encode()
        self.completed = 0
        self.heartbeats = 0

    # --- wiring -------------------------------------------------------------------------------------
    def guard(self, clock: Any, concurrency: int) -> Guard:
        env = {
            "BUSY_GUARD_TABLE": TABLE,
            "BUSY_GUARD_ASG_NAMES": self.group,
            "BUSY_GUARD_HOOK_NAME": HOOK,
            "BUSY_GUARD_TICK_CONCURRENCY": str(concurrency),
        }
        guard = build_guard(config=GuardConfig.from_env(env), session=_session(), clock=clock)
        for client in (guard.table.client, guard.hooks.client):
            client.meta.events.register_first("before-send", self._answer)
        return guard

    def mark_all_draining(self, since: float) -> None:
        """As if every lifecycle event had been delivered: the guard's first look is done."""
        draining = schema.draining_value(schema.Draining(since=since, asg=self.group, hook=HOOK))
        with self._lock:
            for instance_id in self.ids:
                self.items.setdefault(instance_id, {schema.INSTANCE_ID: schema.string(instance_id)})
                self.items[instance_id][schema.DRAINING] = draining

    def forget(self, instance_id: str) -> None:
        with self._lock:
            self.items.pop(instance_id, None)
            self.completed = 0

    # --- answers ------------------------------------------------------------------------------------
    def _answer(self, request: Any, event_name: str, **_: Any) -> AWSResponse:
        operation = event_name.rsplit(".", 1)[-1]
        # botocore runs every before-send handler: keep moto's (when a sandbox is open) off this one.
        request.url = "https://fake.invalid/"
        if self.latency:
            time.sleep(self.latency)
        if ".auto-scaling." in event_name:
            return self._autoscaling(operation, request)
        body = json.loads(request.body or b"{}")
        with self._lock:
            status, answer = self._dynamodb(operation, body)
        return _response(status, json.dumps(answer).encode(), "application/x-amz-json-1.0")

    def _autoscaling(self, operation: str, request: Any) -> AWSResponse:
        if operation == "DescribeAutoScalingGroups":
            return _response(200, self._describe, "text/xml")
        if operation == "DescribeLifecycleHooks":
            xml = (
                f'<DescribeLifecycleHooksResponse xmlns="{_NS}">'
                "<DescribeLifecycleHooksResult><LifecycleHooks>"
                f"<member><LifecycleHookName>{HOOK}</LifecycleHookName>"
                f"<AutoScalingGroupName>{escape(self.group)}</AutoScalingGroupName>"
                "<LifecycleTransition>autoscaling:EC2_INSTANCE_TERMINATING</LifecycleTransition>"
                "<HeartbeatTimeout>900</HeartbeatTimeout><GlobalTimeout>90000</GlobalTimeout>"
                "<DefaultResult>CONTINUE</DefaultResult></member></LifecycleHooks></DescribeLifecycleHooksResult>"
                f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
                "</DescribeLifecycleHooksResponse>"
            )
            return _response(200, xml.encode(), "text/xml")
        if operation == "RecordLifecycleActionHeartbeat":
            with self._lock:
                self.heartbeats += 1
        if operation in ("RecordLifecycleActionHeartbeat", "CompleteLifecycleAction"):
            if operation == "CompleteLifecycleAction":
                with self._lock:
                    self.completed += 1
            params = parse_qs(request.body.decode() if isinstance(request.body, bytes) else request.body)
            assert params.get("LifecycleHookName") == [HOOK]
            xml = (
                f'<{operation}Response xmlns="{_NS}"><{operation}Result/>'
                f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></{operation}Response>"
            )
            return _response(200, xml.encode(), "text/xml")
        raise AssertionError(f"the fake does not answer {operation}")

    def _dynamodb(self, operation: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if operation == "Scan":
            found = [item for item in self.items.values() if schema.DRAINING in item]
            return 200, {"Items": found, "Count": len(found), "ScannedCount": len(self.items)}
        if operation == "BatchGetItem":
            keys = body["RequestItems"][TABLE]["Keys"]
            found = [
                self.items[k[schema.INSTANCE_ID]["S"]]
                for k in keys
                if k[schema.INSTANCE_ID]["S"] in self.items
            ]
            return 200, {"Responses": {TABLE: found}, "UnprocessedKeys": {}}
        if operation == "UpdateItem":
            return self._update(body)
        raise AssertionError(f"the fake does not answer {operation}")

    def _update(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The guard's updates on this path, told apart by their expressions (schema.py)."""
        instance_id = body["Key"][schema.INSTANCE_ID]["S"]
        old = self.items.get(instance_id)
        item = dict(old) if old else {schema.INSTANCE_ID: schema.string(instance_id)}
        expression = body["UpdateExpression"]
        values = body.get("ExpressionAttributeValues", {})
        if "if_not_exists(#draining" in expression:  # mark_draining, ALL_NEW
            item.setdefault(schema.DRAINING, values[":draining"])
            item.pop(schema.TTL, None)
            self.items[instance_id] = item
            return 200, {"Attributes": item}
        if "#draining.#hb" in expression:  # record_heartbeat: on the draining mark
            draining = dict(item[schema.DRAINING]["M"])
            draining[schema.HEARTBEAT_AT] = values[":at"]
            item[schema.DRAINING] = {"M": draining}
            self.items[instance_id] = item
            return 200, {}
        busy = bool(item.get(schema.LEASES, {}).get("M"))
        if "size(#leases)" in body.get("ConditionExpression", "") and busy:  # release_if_idle refused
            return 400, {
                "__type": "com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException",
                "message": "The conditional request failed",
                "Item": old or {},
            }
        item[schema.RELEASED] = values[":released"]
        item[schema.TTL] = values[":ttl"]
        item.pop(schema.DRAINING, None)
        self.items[instance_id] = item
        return 200, {"Attributes": old} if old and body.get("ReturnValues") == "ALL_OLD" else {}

    def _describe_xml(self) -> str:
        """What AWS answers for one group, with the fields a real group has."""
        arn = (
            f"arn:aws:autoscaling:{REGION}:{ACCOUNT}:autoScalingGroup:{uuid.uuid4()}"
            f":autoScalingGroupName/{self.group}"
        )
        template = (
            "<LaunchTemplate><LaunchTemplateId>lt-0123456789abcdef0</LaunchTemplateId>"
            "<LaunchTemplateName>graph-db</LaunchTemplateName><Version>7</Version></LaunchTemplate>"
        )
        instances = "".join(
            f"<member><InstanceId>{i}</InstanceId><InstanceType>r6i.2xlarge</InstanceType>"
            f"<AvailabilityZone>{REGION}a</AvailabilityZone><LifecycleState>Terminating:Wait</LifecycleState>"
            f"<HealthStatus>Healthy</HealthStatus>{template}<ProtectedFromScaleIn>false</ProtectedFromScaleIn>"
            "</member>"
            for i in self.ids
        )
        group = (
            f"<member><AutoScalingGroupName>{escape(self.group)}</AutoScalingGroupName>"
            f"<AutoScalingGroupARN>{arn}</AutoScalingGroupARN>{template}"
            f"<MinSize>0</MinSize><MaxSize>{2 * len(self.ids)}</MaxSize>"
            f"<DesiredCapacity>{len(self.ids)}</DesiredCapacity>"
            f"<DefaultCooldown>300</DefaultCooldown><AvailabilityZones><member>{REGION}a</member></AvailabilityZones>"
            "<LoadBalancerNames/><TargetGroupARNs/><HealthCheckType>EC2</HealthCheckType>"
            f"<HealthCheckGracePeriod>300</HealthCheckGracePeriod><Instances>{instances}</Instances>"
            "<CreatedTime>2026-01-01T00:00:00.000Z</CreatedTime><SuspendedProcesses/>"
            "<VPCZoneIdentifier>subnet-0123456789abcdef0</VPCZoneIdentifier><EnabledMetrics/><Tags/>"
            "<TerminationPolicies><member>Default</member></TerminationPolicies>"
            "<NewInstancesProtectedFromScaleIn>false</NewInstancesProtectedFromScaleIn>"
            "<CapacityRebalance>false</CapacityRebalance></member>"
        )
        return (
            f'<DescribeAutoScalingGroupsResponse xmlns="{_NS}"><DescribeAutoScalingGroupsResult>'
            f"<AutoScalingGroups>{group}</AutoScalingGroups></DescribeAutoScalingGroupsResult>"
            f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
            "</DescribeAutoScalingGroupsResponse>"
        )


def _response(status: int, data: bytes, content_type: str) -> AWSResponse:
    headers = HTTPHeaders()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(data))
    headers["x-amzn-RequestId"] = str(uuid.uuid4())
    return AWSResponse("https://fake.invalid/", status, headers, _Body(data))


_sessions: list[boto3.Session] = []


def _session() -> boto3.Session:
    """One session for every fake guard: clients after the first reuse its loaded service models."""
    if not _sessions:
        _sessions.append(boto3.Session(region_name=REGION))
    return _sessions[0]


@contextmanager
def fake_world(size: int, *, busy: bool, now: float, latency: float = 0.0) -> Iterator[FakeAws]:
    with _support.fake_credentials(), _support.quiet():
        yield FakeAws("graph-db", size, busy=busy, now=now, latency=latency)
