"""A whole busy-guard deployment on moto: the table with its stream, guarded groups with our hook,
the lifecycle-hook emulator, and the real guard handler, all on one injectable clock.

The table and its stream can live on Amazon DynamoDB Local instead (``Sandbox.start(...,
dynamodb_local=server)``): Auto Scaling and EC2 stay on moto and the emulator, while every
DynamoDB client the guard, the writer and the CLI build goes to the real engine (botocore's
``AWS_ENDPOINT_URL_DYNAMODB``), and the guard is woken by the engine's real stream records.

The guard runs unchanged through ``busy_guard.guard.handler.handler``; the sandbox plays the
three triggers: it forwards the emulator's EventBridge events, pumps the table's stream through
the same filter the CDK app installs on the event source, and sends schedule ticks. Used by the
tests, the benchmarks and ``busy-guard demo``. Import it only where moto is installed.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import boto3

from busy_guard import schema
from busy_guard.guard import handler as guard_handler
from busy_guard.guard.config import GuardConfig
from busy_guard.keys import InstanceKeys
from busy_guard.sandbox.dynamodb_local import DynamoDBLocal
from busy_guard.sandbox.environment import REGION, sandbox_environment
from busy_guard.sandbox.hooks import LifecycleHookEmulator
from busy_guard.settings import DEFAULT_KEY_SCHEME, Env
from busy_guard.writer import LeaseHandle, WriterOptions, begin_destructive_op_sync, end_destructive_op_sync

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_dynamodbstreams import DynamoDBStreamsClient
    from mypy_boto3_ec2 import EC2Client

ACCOUNT = "123456789012"
TABLE = "busy_guard.instance_busy"
HOOK = "busy-guard"
MOTO_EXAMPLE_AMI = "ami-12c6146b"


@dataclass
class LambdaContext:
    """The fields Powertools reads from a Lambda context."""

    function_name: str = "busy-guard-sandbox"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:busy-guard-sandbox"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


@dataclass(frozen=True)
class SandboxSettings:
    groups: Mapping[str, int] = field(default_factory=lambda: {"graph-db": 3})
    heartbeat_timeout: int = 900
    default_result: str = "CONTINUE"
    max_wait: float = 12 * 3600
    max_wait_result: str = "CONTINUE"
    extra_hooks: tuple[str, ...] = ()  # other terminating hooks on every group (not ours)
    warm_returns_in_group: bool = True  # see LifecycleHookEmulator
    env: Mapping[str, str] = field(default_factory=dict)

    def guard_env(self, table: str = TABLE) -> dict[str, str]:
        return {
            Env.TABLE: table,
            Env.ASG_NAMES: ",".join(self.groups),
            Env.HOOK_NAME: HOOK,
            Env.HEARTBEAT_TIMEOUT: str(self.heartbeat_timeout),
            Env.MAX_WAIT: str(self.max_wait),
            Env.MAX_WAIT_RESULT: self.max_wait_result,
            # The deployment's key scheme, as a stack's context would give it (the writers get the same
            # through the sandbox's environment); isolated unless the caller's environment says.
            Env.KEY_SCHEME: os.environ.get(Env.KEY_SCHEME, "").strip() or DEFAULT_KEY_SCHEME,
            # The isolated key scheme builds instance ARNs of moto's account and the sandbox's region.
            Env.ACCOUNT_ID: ACCOUNT,
            Env.PARTITION: "aws",
            "AWS_REGION": REGION,
            **self.env,
        }


class Sandbox:
    """Build with :meth:`start` (a context manager that owns moto and the environment)."""

    def __init__(
        self,
        settings: SandboxSettings,
        clock: Callable[[], float],
        *,
        table: str = TABLE,
        local: bool = False,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.engine = "dynamodb-local" if local else "moto"
        self.session = boto3.Session(region_name=REGION)
        self.dynamodb: DynamoDBClient = self.session.client("dynamodb")
        # On moto, botocore routes ARN calls to an account endpoint moto doesn't serve: pin the classic
        # one. On DynamoDB Local the environment's endpoint serves both.
        streams_endpoint = None if local else f"https://streams.dynamodb.{REGION}.amazonaws.com"
        self.streams: DynamoDBStreamsClient = self.session.client(
            "dynamodbstreams", endpoint_url=streams_endpoint
        )
        self.autoscaling: AutoScalingClient = self.session.client("autoscaling")
        self.ec2: EC2Client = self.session.client("ec2")
        self.emulator = LifecycleHookEmulator(
            self.autoscaling,
            clock=clock,
            ec2=self.ec2,
            account_id=ACCOUNT,
            warm_returns_in_group=settings.warm_returns_in_group,
        )
        self.emulator.attach(self.autoscaling)
        self.table_name = table
        self._create_table()
        self._create_groups()
        self.guard = guard_handler.build_guard(
            config=GuardConfig.from_env(settings.guard_env(table)), session=self.session, clock=clock
        )
        self.emulator.attach(self.guard.hooks.client)
        guard_handler.use_guard(self.guard)
        self._stream_arn = self.dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
        self._stream = StreamReader(self.streams, self._stream_arn)
        self.invocations: list[tuple[str, dict[str, Any]]] = []

    @classmethod
    @contextmanager
    def start(
        cls,
        settings: SandboxSettings | None = None,
        *,
        clock: Callable[[], float],
        dynamodb_local: DynamoDBLocal | None = None,
    ) -> Iterator[Sandbox]:
        """The sandbox for the ``with`` block. With ``dynamodb_local``, its table (a fresh one, with a
        unique name, so sandboxes sharing one server stay apart) and stream live there."""
        from moto import mock_aws  # noqa: PLC0415 - sandbox-only dependency

        settings = settings or SandboxSettings()
        table = TABLE if dynamodb_local is None else f"{TABLE}.{uuid.uuid4().hex[:12]}"
        environment = settings.guard_env(table)
        if dynamodb_local is not None:
            # Every DynamoDB and DynamoDB Streams client built in here goes to the real engine.
            environment["AWS_ENDPOINT_URL_DYNAMODB"] = dynamodb_local.endpoint_url
            environment["AWS_ENDPOINT_URL_DYNAMODB_STREAMS"] = dynamodb_local.endpoint_url
        with ExitStack() as stack:
            stack.enter_context(sandbox_environment(environment))
            # moto still serves Auto Scaling and EC2; its lock lets a DynamoDB Local request through
            # at once (moto serves no loopback URL), so the real engine sees real concurrency.
            stack.enter_context(serialized_moto())
            stack.enter_context(mock_aws())
            sandbox = cls(settings, clock, table=table, local=dynamodb_local is not None)
            try:
                yield sandbox
            finally:
                guard_handler.use_guard(None)
                if dynamodb_local is not None:
                    sandbox.dynamodb.delete_table(TableName=table)

    # --- the world ---------------------------------------------------------------------------------
    def instances(self, group: str) -> list[str]:
        groups = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])
        return sorted(i["InstanceId"] for g in groups["AutoScalingGroups"] for i in g.get("Instances", []))

    @property
    def keys(self) -> InstanceKeys:
        """How the sandbox's items are keyed (``BUSY_GUARD_KEY_SCHEME``; isolated unless set)."""
        return self.guard.table.keys

    def item(self, instance_id: str) -> schema.BusyState:
        """The instance's own item (keyed by its ARN under the isolated scheme)."""
        return self.item_at(self.keys.key(instance_id), instance_id)

    def item_at(self, key: str, instance_id: str = "") -> schema.BusyState:
        """The item keyed ``key`` exactly (a bare id is a legacy item under the isolated scheme)."""
        response = self.dynamodb.get_item(TableName=self.table_name, Key=schema.key(key), ConsistentRead=True)
        raw: Any = response.get("Item")
        return schema.parse_item(raw, instance_id or key)

    @property
    def guard_config(self) -> GuardConfig:
        return self.guard.config

    def writer_options(self, lease_ttl: float = 180.0) -> WriterOptions:
        """Writer options for the sandbox's table, client and clock.

        The lease's heartbeat thread waits in real seconds, while the sandbox's clock is simulated,
        so a real-time thread would renew at random simulated moments. It gets an interval it never
        reaches (one second less than the TTL); callers renew with :meth:`renew`, the very method the
        thread calls, at repeatable simulated times."""
        return {
            "table": self.table_name,
            "client": self.dynamodb,
            "clock": self.clock,
            "lease_ttl": lease_ttl,
            "heartbeat_interval": lease_ttl - 1,
        }

    def begin(
        self, instance_id: str, kind: str = "bulk_table_insert", *, lease_ttl: float = 180.0
    ) -> LeaseHandle:
        """A real writer lease (see :meth:`writer_options`); raises if the writer took none. Off EC2 the
        writer can't ask IMDS for its ARN, so it is handed the key the guard reads (an ARN under the
        isolated scheme), as ``BUSY_GUARD_INSTANCE_ARN`` would hand it."""
        lease = begin_destructive_op_sync(self.keys.key(instance_id), kind, **self.writer_options(lease_ttl))
        if lease is None:
            raise RuntimeError(f"the writer took no lease on {instance_id}: see its log")
        return lease

    @staticmethod
    def renew(lease: LeaseHandle) -> bool:
        """Renew now, exactly as the lease's heartbeat thread does at each interval."""
        return lease._writer.heartbeat(lease)

    @staticmethod
    def end(lease: LeaseHandle) -> None:
        end_destructive_op_sync(lease.instance_id, lease)

    # --- the three triggers --------------------------------------------------------------------------
    def invoke(self, event: Any, kind: str = "event") -> dict[str, Any]:
        """One invocation of the real handler, as Lambda would make it."""
        self.invocations.append((kind, event))
        result: dict[str, Any] = guard_handler.handler(event, LambdaContext())
        return result

    def terminate(
        self, instance_id: str, *, destination: str = "EC2", deliver: bool = True
    ) -> list[dict[str, Any]]:
        """Start a termination; deliver the lifecycle events to the guard (as the rule would)."""
        events = self.emulator.terminate(instance_id, destination=destination)
        if deliver:
            for event in events:
                if event["detail"]["LifecycleHookName"] == HOOK:
                    self.invoke(event, "event")
        return events

    def tick(self) -> dict[str, Any]:
        """One schedule tick (and the hook timeouts due by now)."""
        self.emulator.apply_timeouts()
        return self.invoke(scheduled_event(self.clock()), "schedule")

    def pump_stream(self) -> dict[str, Any] | None:
        """Deliver the stream records written since the last pump that pass the event-source
        filter, in one batch, as the DynamoDB event source would."""
        records = [r for r in self._new_stream_records() if matches(schema.stream_filter_pattern(), r)]
        if not records:
            return None
        return self.invoke({"Records": records}, "stream")

    def _new_stream_records(self) -> list[dict[str, Any]]:
        return self._stream.new_records()

    # --- setup ---------------------------------------------------------------------------------------
    def _create_table(self) -> None:
        self.dynamodb.create_table(
            TableName=self.table_name,
            KeySchema=[{"AttributeName": schema.INSTANCE_ID, "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": schema.INSTANCE_ID, "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
        )

    def _create_groups(self) -> None:
        image_id = MOTO_EXAMPLE_AMI
        self.ec2.create_launch_template(
            LaunchTemplateName="busy-guard-sandbox",
            LaunchTemplateData={"ImageId": image_id, "InstanceType": "t3.micro"},
        )
        for group, size in self.settings.groups.items():
            self.autoscaling.create_auto_scaling_group(
                AutoScalingGroupName=group,
                LaunchTemplate={"LaunchTemplateName": "busy-guard-sandbox", "Version": "$Latest"},
                MinSize=0,
                MaxSize=max(size, 1) * 2,
                DesiredCapacity=size,
                AvailabilityZones=[f"{REGION}a"],
            )
            for hook in (HOOK, *self.settings.extra_hooks):
                self.autoscaling.put_lifecycle_hook(
                    AutoScalingGroupName=group,
                    LifecycleHookName=hook,
                    LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                    HeartbeatTimeout=self.settings.heartbeat_timeout,
                    DefaultResult=self.settings.default_result,
                )


class StreamReader:
    """A table's stream, read from its start: each call returns the records written since the last,
    in the shape the Lambda event source delivers them.

    Each call asks for a fresh iterator after the last sequence number it delivered, never keeping
    one: moto undoes a cancelled ``TransactWriteItems`` by restoring a deep copy of its tables, and
    an iterator held across that points at the discarded copy's shard and sees nothing more. (Real
    DynamoDB and DynamoDB Local have no such problem; a fresh iterator costs them one call.)"""

    def __init__(self, streams: DynamoDBStreamsClient, stream_arn: str) -> None:
        self.streams = streams
        self.stream_arn = stream_arn
        self._after: dict[str, str] = {}  # shard id -> the last sequence number delivered

    def new_records(self) -> list[dict[str, Any]]:
        shards = self.streams.describe_stream(StreamArn=self.stream_arn)["StreamDescription"]["Shards"]
        records: list[dict[str, Any]] = []
        for shard in shards:
            shard_id = shard["ShardId"]
            after = self._after.get(shard_id)
            position: Any = (
                {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": after}
                if after is not None
                else {"ShardIteratorType": "TRIM_HORIZON"}
            )
            iterator = self.streams.get_shard_iterator(
                StreamArn=self.stream_arn, ShardId=shard_id, **position
            )
            page = self.streams.get_records(ShardIterator=iterator["ShardIterator"])
            records.extend(_as_lambda_record(r, self.stream_arn) for r in page["Records"])
            if page["Records"]:
                self._after[shard_id] = page["Records"][-1]["dynamodb"]["SequenceNumber"]
        return records


class AwsCallCounter:
    """The AWS calls made through some clients, by operation: botocore's ``before-call`` fires once
    per API call, whatever retries happen underneath. Thread-safe: the tick's workers call at once."""

    def __init__(self, *clients: Any) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._id = f"busy-guard-call-counter-{uuid.uuid4()}"
        self._clients = clients
        for client in clients:
            client.meta.events.register("before-call.*.*", self._count, unique_id=self._id)

    @classmethod
    def of_guard(cls, sandbox: Sandbox) -> AwsCallCounter:
        return cls(sandbox.guard.table.client, sandbox.guard.hooks.client)

    def _count(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.counts[model.name] += 1

    def take(self) -> Counter[str]:
        """The counts since the last take, and start again."""
        with self._lock:
            taken, self.counts = self.counts, Counter()
        return taken

    def close(self) -> None:
        for client in self._clients:
            client.meta.events.unregister("before-call.*.*", unique_id=self._id)


def scheduled_event(now: float) -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": datetime.fromtimestamp(now, tz=UTC).isoformat().replace("+00:00", "Z"),
        "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/busy-guard-reconcile"],
        "detail": {},
    }


def _as_lambda_record(record: Mapping[str, Any], stream_arn: str) -> dict[str, Any]:
    """A DynamoDB Streams record in the shape the Lambda event source delivers it."""
    delivered = dict(record)
    delivered["eventSourceARN"] = stream_arn
    dynamodb = dict(delivered.get("dynamodb", {}))
    created = dynamodb.get("ApproximateCreationDateTime")
    if isinstance(created, datetime):
        dynamodb["ApproximateCreationDateTime"] = created.timestamp()
    for image in ("Keys", "NewImage", "OldImage"):
        if isinstance(dynamodb.get(image), Mapping):
            dynamodb[image] = {name: typed_empty_maps(value) for name, value in dynamodb[image].items()}
    delivered["dynamodb"] = dynamodb
    return delivered


def typed_empty_maps(value: Any) -> Any:
    """An attribute value with every untyped empty value ``{}`` read as the empty map ``{"M": {}}``.

    DynamoDB Local's stream records (3.x) write an empty map without its type, as ``{}``; the item
    itself (GetItem) keeps ``{"M": {}}``, and so do AWS's streams, whose AttributeValue always
    carries exactly one type. The quirk is absorbed here, in the sandbox's record adapter, and
    not in the guard's parser: production never receives ``{}``, and a parser that read an
    untyped value as "no leases" would turn any malformed value into a release, where today it is
    an unreadable lease that holds the instance. The busy table has no lists, and a DynamoDB
    Local empty list keeps its type (``{"L": []}``), so ``{}`` can only be an empty map here.
    """
    if not isinstance(value, Mapping):
        return value
    if not value:
        return {"M": {}}
    if isinstance(value.get("M"), Mapping):
        return {"M": {name: typed_empty_maps(inner) for name, inner in value["M"].items()}}
    if isinstance(value.get("L"), list):
        return {"L": [typed_empty_maps(inner) for inner in value["L"]]}
    return value


# --- the event-source filter, as Lambda evaluates it (the subset the stack uses) ---------------------
def matches(pattern: Mapping[str, Any], event: Any) -> bool:
    """EventBridge-style pattern matching: nested maps, value lists, ``exists``, ``anything-but``,
    ``prefix``. Enough to run the stack's own filter against real stream records."""
    if not isinstance(event, Mapping):
        return False
    for key, expected in pattern.items():
        if isinstance(expected, Mapping):
            if not matches(expected, event.get(key)):
                return False
        elif not any(_match_value(rule, key, event) for rule in expected):
            return False
    return True


def _match_value(rule: Any, key: str, event: Mapping[str, Any]) -> bool:
    present = key in event and not isinstance(event[key], Mapping | list)
    value = event.get(key)
    if isinstance(rule, Mapping):
        if "exists" in rule:
            return bool(rule["exists"]) == (key in event)
        if "anything-but" in rule:
            excluded = rule["anything-but"]
            excluded = excluded if isinstance(excluded, list) else [excluded]
            return present and value not in excluded
        if "prefix" in rule:
            return present and isinstance(value, str) and value.startswith(rule["prefix"])
        raise ValueError(f"unsupported filter rule: {rule}")
    return present and value == rule


@contextmanager
def serialized_moto() -> Iterator[None]:
    """Serve moto's requests one at a time.

    Real DynamoDB serializes the writes to one item; moto's in-process backend does not and corrupts
    its own state when threads update one item at once (the tick's workers, the writer's heartbeat
    threads). One lock around its request handler gives back DynamoDB's semantics.
    """
    from moto.core.botocore_stubber import BotocoreStubber  # noqa: PLC0415 - sandbox-only dependency

    lock = threading.RLock()
    original = BotocoreStubber.process_request

    def serialized(self: BotocoreStubber, request: Any) -> Any:
        with lock:
            return original(self, request)

    BotocoreStubber.process_request = serialized  # type: ignore[method-assign]
    try:
        yield
    finally:
        BotocoreStubber.process_request = original  # type: ignore[method-assign]
