"""What every benchmark shares: quiet output, AWS call counters, modelled network latency, tables,
machine facts, and fast set-up of big sandbox worlds.

Nothing here asserts a wall-clock limit: the benchmarks print figures, the tests judge behaviour.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import platform
import re
import statistics
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from botocore.awsrequest import AWSResponse

from busy_guard.sandbox.environment import sandbox_environment
from busy_guard.sandbox.world import AwsCallCounter

REPO = Path(__file__).resolve().parents[2]
START = 1_800_000_000.0  # simulated epoch seconds every benchmark clock starts at
# A typical in-region AWS API round trip (DynamoDB single-item calls are often under 10 ms, Auto
# Scaling control-plane calls often 20-50 ms): the modelled latency, not a measurement.
MODEL_LATENCY = 0.020
LAMBDA_FULL_VCPU_MB = 1769  # Lambda gives one full vCPU at 1,769 MB; CPU share scales with memory


# --- output -----------------------------------------------------------------------------------------
# The guard prints EMF metrics and JSON logs to stdout; ``quiet`` sends those away, and the report is
# written to the stdout this module saw when it was imported.
_STDOUT = sys.stdout


def emit(line: str = "") -> None:
    _STDOUT.write(line + "\n")
    _STDOUT.flush()


def heading(title: str) -> None:
    emit()
    emit(f"## {title}")
    emit()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Iterable[int] = ()) -> None:
    """A Markdown table with padded columns: readable in a terminal, pasteable into the docs."""
    body = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(headers)
    ]
    aligned = set(right)

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if i in aligned else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    emit(line([str(h) for h in headers]))
    emit(
        "|"
        + "|".join(("-" * (w + 1) + ":") if i in aligned else ("-" * (w + 2)) for i, w in enumerate(widths))
        + "|"
    )
    for row in body:
        emit(line(row))
    emit()


def note(text: str) -> None:
    """A paragraph (lines are joined) or several, separated by blank lines."""
    for paragraph in text.strip().split("\n\n"):
        emit(" ".join(line.strip() for line in paragraph.strip().splitlines()))
        emit()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def secs(seconds: float) -> str:
    return f"{seconds:,.2f} s"


def breakdown(counts: Mapping[str, int]) -> str:
    """``DescribeAutoScalingGroups 1, Scan 1, RecordLifecycleActionHeartbeat 10``, by fixed order."""
    order = [
        "DescribeAutoScalingGroups",
        "Scan",
        "BatchGetItem",
        "GetItem",
        "UpdateItem",
        "RecordLifecycleActionHeartbeat",
        "CompleteLifecycleAction",
    ]
    names = [n for n in order if counts.get(n)] + sorted(n for n in counts if n not in order and counts[n])
    return ", ".join(f"{SHORT.get(n, n)} {counts[n]:,}" for n in names) or "none"


SHORT = {
    "DescribeAutoScalingGroups": "Describe",
    "RecordLifecycleActionHeartbeat": "Heartbeat",
    "CompleteLifecycleAction": "Complete",
}


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# --- the machine --------------------------------------------------------------------------------------
def machine_facts() -> list[tuple[str, str]]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    memory = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        memory = f"{int(match.group(1)) / 1024 / 1024:.1f} GiB" if match else memory
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return [
        ("CPU", f"{cpu} ({cores} cores usable, `nproc` = {os.cpu_count()})"),
        ("memory", memory),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", sys.version.split()[0]),
        (
            "packages",
            ", ".join(
                f"{n} {version(n)}"
                for n in ("boto3", "botocore", "moto", "pydantic", "aws-lambda-powertools", "aws-xray-sdk")
            ),
        ),
    ]


def lambda_limits() -> tuple[int, int]:
    """(timeout seconds, memory MB) of the guard Lambda, read from the CDK construct's source (importing
    it would load the whole CDK)."""
    source = (REPO / "infra/busy_guard_infra/constructs/guard.py").read_text()
    timeout = re.search(r"^FUNCTION_TIMEOUT = Duration\.seconds\((\d+)\)", source, re.M)
    memory = re.search(r"^FUNCTION_MEMORY_MB = (\d+)", source, re.M)
    return (int(timeout.group(1)) if timeout else 0, int(memory.group(1)) if memory else 0)


# --- quiet -------------------------------------------------------------------------------------------
class _Null(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No Powertools JSON logs, no EMF metric blobs, no writer warnings, no Python warnings: the
    guard logs a line per instance and a benchmark reconciles thousands."""
    from busy_guard.guard.observability import logger

    handler: Any = logger.registered_handler
    old_stream = handler.setStream(_Null())
    writer_loggers = [logging.getLogger(name) for name in ("busy_guard", "botocore", "urllib3")]
    old_levels = [lg.level for lg in writer_loggers]
    for lg in writer_loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_Null()):
            warnings.simplefilter("ignore")
            yield
    finally:
        handler.setStream(old_stream)
        for lg, level in zip(writer_loggers, old_levels, strict=True):
            lg.setLevel(level)


def fake_credentials() -> contextlib.AbstractContextManager[None]:
    """Static fake credentials and no IMDS, so no client ever waits on a credential provider."""
    return sandbox_environment()


# --- counting and slowing AWS calls ------------------------------------------------------------------
class AwsCalls(AwsCallCounter):
    """The sandbox's call counter, over a list of clients."""

    def __init__(self, clients: Iterable[Any]) -> None:
        super().__init__(*clients)


@contextlib.contextmanager
def network_latency(clients: Iterable[Any], seconds: float) -> Iterator[None]:
    """Add ``seconds`` to every HTTP attempt of these clients, as a network round trip would.

    Registered last on ``before-send``, so it runs after moto has answered and released its lock: the
    sleeps of concurrent calls overlap like real round trips do, while moto's own work stays serial.
    """
    unique = f"bench-latency-{uuid.uuid4()}"
    targets = list(clients)

    def sleep(**_: Any) -> None:
        time.sleep(seconds)

    for client in targets:
        client.meta.events.register("before-send", sleep, unique_id=unique)
    try:
        yield
    finally:
        for client in targets:
            client.meta.events.unregister("before-send", unique_id=unique)


def guard_clients(sb: Any) -> list[Any]:
    return [sb.guard.table.client, sb.guard.hooks.client]


# --- big sandbox worlds ----------------------------------------------------------------------------
@contextlib.contextmanager
def world(groups: Mapping[str, int], clock: Any, env: Mapping[str, str] | None = None) -> Iterator[Any]:
    """A quiet sandbox with these groups; the set-up is the caller's to time."""
    from busy_guard.sandbox.world import Sandbox, SandboxSettings

    with quiet(), Sandbox.start(SandboxSettings(groups=dict(groups), env=dict(env or {})), clock=clock) as sb:
        yield sb


def use_concurrency(sb: Any, workers: int) -> None:
    """Swap the sandbox's guard for one whose only difference is ``BUSY_GUARD_TICK_CONCURRENCY``
    (same clients, same table, same clock): cheaper than building a 1,000-instance world per value."""
    from busy_guard.guard import handler
    from busy_guard.guard.config import GuardConfig
    from busy_guard.guard.reconcile import Guard

    env = {**sb.settings.guard_env(), "BUSY_GUARD_TICK_CONCURRENCY": str(workers)}
    guard = Guard(
        table=sb.guard.table, hooks=sb.guard.hooks, config=GuardConfig.from_env(env), clock=sb.clock
    )
    handler.use_guard(guard)


def all_instances(sb: Any) -> dict[str, list[str]]:
    return {group: sb.instances(group) for group in sb.settings.groups}


def busy_items(
    instance_ids: Iterable[str], now: float, *, lease_ttl: float = 10 * 3600
) -> list[dict[str, Any]]:
    """Items exactly as the writer's begin leaves them: one live lease each."""
    from busy_guard import schema

    items = []
    for instance_id in instance_ids:
        lease = schema.Lease(uuid.uuid4().hex, "bulk_table_insert", "bench:1", now, now, now + lease_ttl)
        items.append(
            {
                schema.INSTANCE_ID: schema.string(instance_id),
                schema.LEASES: {"M": {lease.lease_id: schema.lease_value(lease)}},
                schema.COUNTER: schema.num(1),
                schema.LAST_OP_AT: schema.string(schema.iso(now)),
                schema.LAST_OP_KIND: schema.string(lease.kind),
            }
        )
    return items


def put_items(sb: Any, items: Sequence[Mapping[str, Any]]) -> None:
    """BatchWriteItem, 25 at a time (set-up, not the guard's calls)."""
    for start in range(0, len(items), 25):
        requests: Any = [{"PutRequest": {"Item": item}} for item in items[start : start + 25]]
        pending: Any = {sb.table_name: requests}
        while pending:
            pending = sb.dynamodb.batch_write_item(RequestItems=pending).get("UnprocessedItems") or None


@contextlib.contextmanager
def _cached_describes(client: Any) -> Iterator[None]:
    """Answer repeated DescribeAutoScalingGroups/DescribeLifecycleHooks calls of the emulator's own
    client from a cache while many terminations start: moto serializes the whole group on every call
    (about a second for 1,000 instances), which makes starting N terminations O(N^2). The emulator
    only reads the group's ARN and hooks from them, which set-up does not change."""
    cache: dict[str, Any] = {}
    unique = f"bench-cache-{uuid.uuid4()}"
    operations = ("DescribeAutoScalingGroups", "DescribeLifecycleHooks")

    def before(model: Any, params: Any, context: dict[str, Any], **_: Any) -> Any:
        key = f"{model.name}:{sorted(params.get('body', {}).items())}"
        context["bench_cache_key"] = key
        if key in cache:
            return AWSResponse("https://cache.invalid/", 200, {}, None), cache[key]
        return None

    def after(parsed: Any, context: Any, http_response: Any, **_: Any) -> None:
        key = context.get("bench_cache_key")
        if key and key not in cache and http_response is not None and http_response.status_code < 300:
            # The emulator reads the group's ARN and its hooks; the instance list is what costs.
            kept = copy.deepcopy({k: v for k, v in parsed.items() if k != "AutoScalingGroups"})
            groups = [
                {k: v for k, v in g.items() if k != "Instances"} for g in parsed.get("AutoScalingGroups", [])
            ]
            if groups:
                kept["AutoScalingGroups"] = copy.deepcopy(groups)
            cache[key] = kept

    for operation in operations:
        client.meta.events.register(
            f"before-call.auto-scaling.{operation}", before, unique_id=f"{unique}-b-{operation}"
        )
        client.meta.events.register(
            f"after-call.auto-scaling.{operation}", after, unique_id=f"{unique}-a-{operation}"
        )
    try:
        yield
    finally:
        for operation in operations:
            client.meta.events.unregister(
                f"before-call.auto-scaling.{operation}", unique_id=f"{unique}-b-{operation}"
            )
            client.meta.events.unregister(
                f"after-call.auto-scaling.{operation}", unique_id=f"{unique}-a-{operation}"
            )


def start_terminations(sb: Any, instance_ids: Iterable[str], *, deliver: bool) -> list[dict[str, Any]]:
    """Put every instance in ``Terminating:Wait`` (an instance refresh). With ``deliver`` the guard gets
    each lifecycle event (its first look); without, the events are lost and the tick must adopt them."""
    events: list[dict[str, Any]] = []
    with _cached_describes(sb.autoscaling):
        for instance_id in instance_ids:
            events.extend(sb.terminate(instance_id, deliver=deliver))
    return events


@dataclass
class Timed:
    seconds: float
    cpu: float
    value: Any = None


def timed(function: Any, *args: Any, **kwargs: Any) -> Timed:
    wall, cpu = time.perf_counter(), time.process_time()
    value = function(*args, **kwargs)
    return Timed(time.perf_counter() - wall, time.process_time() - cpu, value)


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


# --- the 1,000-instance refresh world, shared by ``calls`` and ``throughput`` ----------------------
SHARED_WORLD_USERS = ("calls", "throughput")
REFRESH_GROUP = "refresh"


@dataclass
class TickFigure:
    calls: Counter[str]
    seconds: float
    cpu: float
    steps: Counter[str]
    errors: int

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@dataclass
class RefreshWorld:
    """One group of ``size`` busy instances, all terminating at once (an instance refresh) with their
    lifecycle events lost, so the first tick adopts every one; later ticks are the steady state."""

    size: int
    sb: Any
    clock: Any
    ids: list[str]
    setup: list[tuple[str, float]]
    adoption: TickFigure
    latency_of_adoption: float
    steady: dict[tuple[int, float], TickFigure]

    def steady_tick(self, concurrency: int, latency: float = 0.0) -> TickFigure:
        key = (concurrency, latency)
        if key not in self.steady:
            use_concurrency(self.sb, concurrency)
            self.steady[key] = run_tick(self.sb, self.clock, latency=latency)
        return self.steady[key]


_shared: dict[str, Any] = {}


def run_tick(sb: Any, clock: Any, *, latency: float = 0.0, advance: float = 60.0) -> TickFigure:
    """One schedule tick ``advance`` seconds on, through the real handler; the guard's calls counted."""
    calls = AwsCalls(guard_clients(sb))
    clock.advance(advance)
    try:
        with network_latency(guard_clients(sb), latency) if latency else contextlib.nullcontext():
            result = timed(_tick_quietly, sb)
    finally:
        calls.close()
    report = result.value
    steps = Counter(outcome["step"] for outcome in report.get("outcomes", []))
    return TickFigure(calls.take(), result.seconds, result.cpu, steps, int(report.get("errors", 0)))


def _tick_quietly(sb: Any) -> dict[str, Any]:
    from busy_guard.guard.handler import ReconcileError

    try:
        return sb.tick()
    except ReconcileError as error:  # counted, not raised: a benchmark reports what happened
        return {"outcomes": [], "errors": str(error)}


def refresh_world(quick: bool) -> RefreshWorld:
    size = 200 if quick else 1000
    existing = _shared.get("world")
    if existing is not None and existing.size == size:
        return existing
    close_shared_world()
    from busy_guard.sandbox.clock import ManualClock

    stack = contextlib.ExitStack()
    clock = ManualClock(START)
    setup: list[tuple[str, float]] = []
    begun = time.perf_counter()
    sb = stack.enter_context(world({REFRESH_GROUP: size}, clock))
    setup.append((f"sandbox: moto, table, 1 group of {size:,} instances", time.perf_counter() - begun))
    ids = sb.instances(REFRESH_GROUP)
    step = timed(put_items, sb, busy_items(ids, clock()))
    setup.append((f"{size:,} items with a live lease (BatchWriteItem)", step.seconds))
    step = timed(start_terminations, sb, ids, deliver=False)
    setup.append((f"{size:,} terminations started, events lost (emulator)", step.seconds))
    _shared["stack"] = stack
    # The first tick adopts them all, at the default concurrency, with the modelled network latency.
    use_concurrency(sb, 16)
    adoption = run_tick(sb, clock, latency=MODEL_LATENCY)
    created = RefreshWorld(size, sb, clock, ids, setup, adoption, MODEL_LATENCY, {})
    _shared["world"] = created
    return created


def close_shared_world() -> None:
    stack = _shared.pop("stack", None)
    _shared.pop("world", None)
    if stack is not None:
        stack.close()
