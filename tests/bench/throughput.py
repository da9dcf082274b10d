"""One schedule tick with 1,000 instances waiting at once (a big instance refresh).

Three views, labelled in the output, because no single one is the real figure:

A. moto, as is: the real guard through its handler against the sandbox. moto is slow (most of a
   second to serialize a 1,000-instance group, milliseconds per call) and serves one request at a
   time (``serialized_moto``), so concurrency cannot overlap anything here.
B. moto plus a modelled network: every call of the guard's clients also sleeps ``MODEL_LATENCY``
   after moto has answered and released its lock, so concurrent calls overlap their round trips the
   way they do against AWS, while moto's own work stays serial.
C. no moto: the guard's real clients against canned AWS-shaped answers (``_fake_aws``), to measure
   what the guard and botocore cost in CPU and what concurrency does when the server answers in
   parallel; from that CPU, an estimate for the Lambda's memory size (CPU share scales with memory).
"""

from __future__ import annotations

from typing import Any

from busy_guard.guard.reconcile import Guard
from busy_guard.sandbox.clock import ManualClock
from busy_guard.schema import Draining, Released
from tests.bench import _support
from tests.bench._fake_aws import fake_world
from tests.bench._support import MODEL_LATENCY, AwsCalls, heading, note, secs, table


def run(quick: bool) -> None:
    heading("3. Reconcile throughput: one tick, every instance of a refresh waiting at once")
    timeout, memory = _support.lambda_limits()
    world = _support.refresh_world(quick)
    size = world.size
    lat_ms = f"+{MODEL_LATENCY * 1000:.0f} ms/call"

    table(
        ["set-up (not the guard's time)", "wall"], [(label, secs(s)) for label, s in world.setup], right=[1]
    )

    rows: list[list[Any]] = []

    def add(
        view: str, tick: str, workers: int, network: str, figure: _support.TickFigure, computed: bool
    ) -> None:
        steps = ", ".join(f"{n:,} {s}" for s, n in sorted(figure.steps.items()))
        wall = figure.seconds + figure.total * MODEL_LATENCY if computed else figure.seconds
        cpu = "" if computed else secs(figure.cpu)
        network = f"{network}, computed" if computed else network
        rows.append([view, tick, workers, network, f"{figure.total:,}", steps, secs(wall), cpu])

    steady = "steady (all marked)"
    unmodelled = {workers: world.steady_tick(workers) for workers in (1, 16)}
    for workers, figure in unmodelled.items():
        add("A moto", steady, workers, "none", figure, computed=False)
    add("B moto+net", "adoption (events lost)", 16, lat_ms, world.adoption, computed=False)
    add("B moto+net", steady, 1, lat_ms, unmodelled[1], computed=True)
    for workers in (4, 16):
        add("B moto+net", steady, workers, lat_ms, world.steady_tick(workers, MODEL_LATENCY), computed=False)
    table(
        ["view", f"tick, {size:,} waiting", "workers", "network", "calls", "outcomes", "tick wall", "CPU"],
        rows,
        right=[2, 4, 6, 7],
    )
    note(
        f"""A: moto's serial work dominates (its Scan of {size:,} items and the group's describe alone
        take seconds here), so workers change nothing. B with 1 worker is computed, not run: every call
        then waits its round trip in turn, so it is exactly A's time plus calls x
        {MODEL_LATENCY * 1000:.0f} ms. Wall times on this shared 2-core machine move with its load
        (see the load average); CPU (all threads of the process, moto included) moves less. The CDK
        app gives the guard a {timeout} s timeout and {memory} MB."""
    )
    _without_moto(size, memory, timeout)


def _without_moto(size: int, memory: int, timeout: int) -> None:
    share = memory / _support.LAMBDA_FULL_VCPU_MB if memory else 1.0
    rows: list[list[Any]] = []
    cpu_per_call: dict[str, float] = {}
    worst: tuple[float, float, int] = (0.0, 0.0, 0)  # estimate, its CPU part, workers
    scenarios = [("steady", "all marked, busy", False), ("adoption", "events lost, busy", True)]
    for name, label, adopt in scenarios:
        base: _support.Timed | None = None
        total = 0
        for workers, latency in (
            (1, 0.0),
            (1, MODEL_LATENCY),
            (4, MODEL_LATENCY),
            (8, MODEL_LATENCY),
            (16, MODEL_LATENCY),
        ):
            if adopt and workers in (4, 8):
                continue  # the steady tick shows what fewer workers do; these would sleep for 10 s and more
            if workers == 1 and latency:
                assert base is not None
                wall, cpu, how = base.seconds + total * latency, base.cpu, "computed"  # sequential: additive
            else:
                timed, total = _fake_tick(size, adopt=adopt, workers=workers, latency=latency)
                if workers == 1:
                    base = timed
                    cpu_per_call[name] = timed.cpu / total
                wall, cpu, how = timed.seconds, timed.cpu, "measured"
            lambda_cpu = cpu / share
            estimate = max(lambda_cpu, (total * latency + lambda_cpu) / workers)
            if latency and workers > 1 and estimate > worst[0]:
                worst = (estimate, lambda_cpu, workers)
            network = f"+{latency * 1000:.0f} ms/call" if latency else "none"
            rows.append(
                [
                    f"{name}: {label}",
                    workers,
                    network,
                    f"{total:,}",
                    secs(cpu),
                    f"{secs(wall)} ({how})",
                    secs(estimate),
                ]
            )
    table(
        [
            "C no moto: tick",
            "workers",
            "network",
            "calls",
            "CPU here",
            "tick wall here",
            f"Lambda {memory} MB estimate",
        ],
        rows,
        right=[1, 3, 4, 5, 6],
    )
    per_call = ", ".join(f"{name} {seconds * 1000:.2f} ms" for name, seconds in cpu_per_call.items())
    estimate, cpu_part, workers = worst
    target = timeout / 4
    needed = _support.LAMBDA_FULL_VCPU_MB * (cpu_part * share) / target if target else 0
    note(
        f"""C is the guard plus botocore (serializing, signing, parsing; not HTTP/TLS) against canned
        answers; CPU per call on this machine: {per_call}, most of it botocore's. Lambda gives a
        function CPU in proportion to its memory, one vCPU at {_support.LAMBDA_FULL_VCPU_MB:,} MB, so
        {memory} MB is about {share:.2f} vCPU; the estimate is max(CPU / {share:.2f}, (calls x latency +
        CPU / {share:.2f}) / workers), assuming a Lambda vCPU about as fast as one core here (an
        assumption: the function runs on arm64)."""
    )
    bound = "CPU-bound" if cpu_part >= estimate * 0.99 else "partly latency-bound"
    note(
        f"""Worst case, a refresh of {size:,} busy instances whose events were all lost, at {workers}
        workers: about {secs(estimate)} of the {timeout} s timeout, {bound} at {memory} MB (CPU part
        {secs(cpu_part)}). Workers overlap round trips only, and each extra thread costs some CPU: once
        the CPU part dominates, more memory is the lever (about {needed:,.0f} MB would bring that CPU
        under a quarter of the timeout)."""
    )


def _fake_tick(size: int, *, adopt: bool, workers: int, latency: float) -> tuple[_support.Timed, int]:
    clock = ManualClock(_support.START)
    with fake_world(size, busy=True, now=clock(), latency=latency) as fake:
        guard = fake.guard(clock, workers)
        _warm_up(fake, guard)
        if not adopt:
            fake.mark_all_draining(clock())
        calls = AwsCalls([guard.table.client, guard.hooks.client])
        clock.advance(60)
        timed = _support.timed(guard.tick)
        report = timed.value
        if report.errors:
            raise RuntimeError(f"the fake tick failed: {report.errors[0]}")
        return timed, sum(calls.take().values())


def _warm_up(fake: Any, guard: Guard) -> None:
    """One call of each operation first, as a warm Lambda container has made them: a new client
    loads its operation models and endpoint rules on first use (tens of milliseconds)."""
    group, probe = fake.group, "i-0000000000000warm"
    guard.hooks.waiting_instances([group])
    guard.table.draining_items()
    guard.table.get_many([fake.ids[0]])
    guard.table.release_if_idle(probe, Released(0, "idle", "warm-up"), ttl=0, not_before=0)
    if fake.busy:  # the refused form too: a ConditionalCheckFailed answer, parsed as an error
        guard.table.release_if_idle(fake.ids[0], Released(0, "idle", "warm-up"), ttl=0, not_before=0)
    guard.table.mark_draining(probe, Draining(since=0, asg=group, hook="busy-guard"))
    guard.table.release(probe, Released(0, "idle", "warm-up"), ttl=0, draining_since=0)
    guard.hooks.heartbeat(group, probe)
    guard.hooks.complete(group, probe, "CONTINUE")
    fake.forget(probe)
