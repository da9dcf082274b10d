"""``python -m tests.bench [--only NAME[,NAME]] [--quick]``: run the benchmarks, print a report."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from tests.bench import _support

BENCHMARKS = {
    "latency": "release latency: last lease ended / writer crashed -> CompleteLifecycleAction",
    "calls": "AWS calls per decision and per schedule tick",
    "heartbeats": "heartbeat calls per tick for 1, 100 and 1,000 held instances, before and after",
    "throughput": "one tick with 1,000 instances waiting at once",
    "cold_start": "import time of the guard's handler against boto3's",
    "writer": "writer begin/end cost, and begin against a dead table",
    "engine": "on Amazon DynamoDB Local: begin+end against two bare UpdateItem calls, stream record delay",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these ({', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller samples and worlds (200 instances, not 1,000)"
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for value in args.only for name in value.split(",") if name.strip()] or list(
        BENCHMARKS
    )
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    # Never a developer's AWS profile, never IMDS: every figure comes from moto, a fake or localhost.
    os.environ.pop("AWS_PROFILE", None)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "infra"))

    started = time.perf_counter()
    _support.emit("# busy-guard benchmarks" + (" (--quick)" if args.quick else ""))
    _support.emit()
    _support.table(
        ["machine", ""], [*_support.machine_facts(), ("load average at start", _support.load_average())]
    )
    spent: list[tuple[str, float, float]] = []
    cpu_started = time.process_time()
    order = [name for name in BENCHMARKS if name in chosen]
    for position, name in enumerate(order):
        module = importlib.import_module(f"tests.bench.{name}")
        begun, cpu_begun = time.perf_counter(), time.process_time()
        module.run(quick=args.quick)
        spent.append((name, time.perf_counter() - begun, time.process_time() - cpu_begun))
        following = order[position + 1 :]
        if not following or following[0] not in _support.SHARED_WORLD_USERS:
            _support.close_shared_world()
        sys.stdout.flush()
    total = time.perf_counter() - started
    _support.heading("Run")
    _support.table(
        ["benchmark", "wall time", "CPU of this process (not its subprocesses)"],
        [
            *((name, _support.secs(wall), _support.secs(cpu)) for name, wall, cpu in spent),
            ("total", _support.secs(total), _support.secs(time.process_time() - cpu_started)),
        ],
        right=[1, 2],
    )
    _support.emit(f"load average at the end: {_support.load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
