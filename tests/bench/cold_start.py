"""Cold start: what importing the guard's handler costs, against importing boto3 alone.

``python -X importtime`` in fresh interpreters (median of 5 after one warm-up each, so the disk cache
and the .pyc files are warm, as they are in a Lambda image after its first start). Import time is a
ratio on purpose: absolute microseconds depend on the machine, the ratio much less. Also the first
invocation's one-off work (validating the configuration, creating the two clients), which Lambda
pays on the first event a container handles.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.bench import _support
from tests.bench._support import heading, note, table

RUNS = 5
LAMBDAS = Path(__file__).resolve().parents[2] / "lambdas"
HANDLER = "busy_guard.guard.handler"
# The handler import, then the first invocation's one-off work, timed in the same interpreter.
WITH_FIRST_INVOCATION = f"""
import time
import {HANDLER} as handler
from busy_guard.guard.config import GuardConfig
env = {{"BUSY_GUARD_TABLE": "busy_guard.instance_busy", "BUSY_GUARD_ASG_NAMES": "graph-db"}}
started = time.perf_counter()
handler.build_guard(config=GuardConfig.from_env(env), session=handler.boto3.Session(region_name="us-east-1"))
print(time.perf_counter() - started)
"""
# The same import without running busy_guard/__init__.py (which imports the writer): what a lazy
# package root would save.
WITHOUT_WRITER = (
    "import sys, types; root = types.ModuleType('busy_guard'); "
    f"root.__path__ = [{str(LAMBDAS / 'busy_guard')!r}]; sys.modules['busy_guard'] = root; "
    f"import {HANDLER}"
)


def run(quick: bool) -> None:
    heading("4. Cold start: importing the handler against importing boto3")
    runs = 3 if quick else RUNS
    boto3_runs, handler_runs, lean_runs, firsts = [], [], [], []
    for round_ in range(runs + 1):  # interleaved, so a busy neighbour slows all three alike
        boto3_rows, _ = _importtime("import boto3")
        handler_rows, output = _importtime(WITH_FIRST_INVOCATION)
        lean_rows, _ = _importtime(WITHOUT_WRITER)
        if round_ == 0:
            continue  # warm-up: disk cache and .pyc files, as in a Lambda image after its first start
        boto3_runs.append(_total(boto3_rows, "boto3"))
        handler_runs.append(handler_rows)
        lean_runs.append(lean_rows)
        firsts.append(float(output.strip().splitlines()[-1]))
    boto3_us = statistics.median(boto3_runs)
    handler_us = statistics.median(_total(rows, HANDLER) for rows in handler_runs)
    lean_us = statistics.median(_total(rows, HANDLER) for rows in lean_runs)
    lean_names = {name.strip() for rows in lean_runs for _s, _c, name in _subtree(rows, HANDLER)}
    # ``types`` is imported by the lean variant's own preamble, outside the subtree compared.
    only_names = (
        {name.strip() for rows in handler_runs for _s, _c, name in _subtree(rows, HANDLER)}
        - lean_names
        - {"types"}
    )
    writer_only = [
        sum(own for own, _c, name in _subtree(rows, HANDLER) if name.strip() in only_names)
        for rows in handler_runs
    ]
    writer_us = statistics.median(writer_only)

    table(
        ["import", f"cumulative (median of {runs})", "x boto3"],
        [
            ("boto3", _ms(boto3_us), "1.00"),
            (HANDLER, _ms(handler_us), f"{handler_us / boto3_us:.2f}"),
            (
                "  the same, without busy_guard/__init__ (no writer)",
                _ms(lean_us),
                f"{lean_us / boto3_us:.2f}",
            ),
            (
                f"  of the handler's: the {len(only_names)} modules only the writer brings (self time)",
                _ms(writer_us),
                f"{writer_us / boto3_us:.2f}",
            ),
        ],
        right=[1, 2],
    )
    table(
        ["first invocation, after the import", f"median of {runs}"],
        [("configuration + two boto3 clients (build_guard)", _support.ms(statistics.median(firsts)))],
        right=[1],
    )
    ratio = handler_us / boto3_us
    by_package = _by_package(handler_runs)
    total = sum(by_package.values())
    rows = [
        (package, _ms(us), f"{100 * us / total:.0f} %", NEEDED.get(package, ""))
        for package, us in sorted(by_package.items(), key=lambda kv: -kv[1])[:10]
    ]
    table(
        ["top-level package (self time summed)", "median", "share", "needed on every invocation?"],
        rows,
        right=[1, 2],
    )
    note(
        f"""The handler costs {ratio:.1f}x boto3's import, and boto3 is part of it. The heaviest part
        is the X-Ray SDK: Powertools' Tracer imports it at construction, and ``aws_xray_sdk.core``
        builds its global recorder at import, whose sampler creates two botocore X-Ray clients (most
        of that self time). The function runs with active tracing, so every invocation uses the
        recorder: deferring it would only move the cost to the first event; dropping it means giving
        up the traces (a design choice, not a tuning). pydantic (the event models and the
        configuration) is needed on every invocation too. The one import the guard never uses is the
        writer, pulled in by the package root ``busy_guard/__init__.py``: {len(only_names)} modules
        ({", ".join(sorted(only_names))}), {_ms(writer_us)} here, {100 * writer_us / handler_us:.0f} %
        of the handler's import: too little to justify a lazy package root (asyncio, the writer's
        heaviest import, is loaded by the X-Ray SDK anyway). Differences between whole imports of
        separate runs are noise at this size on a shared machine; the per-module sum is measured
        within each run."""
    )


NEEDED = {
    "botocore": "yes (the clients)",
    "boto3": "yes (the session)",
    "urllib3": "yes (HTTP)",
    "pydantic": "yes (events, config)",
    "pydantic_core": "yes (events, config)",
    "aws_lambda_powertools": "yes (logs, metrics, tracing)",
    "aws_xray_sdk": "yes (active tracing)",
    "asyncio": "yes (the X-Ray SDK's async recorder; the writer too)",
    "busy_guard": "yes (schema, decision, guard)",
    "s3transfer": "no: boto3 imports it",
    "multiprocessing": "no: boto3 imports it (s3transfer)",
    "annotated_types": "yes (pydantic)",
    "concurrent": "yes (the tick's thread pool)",
    "xml": "yes (botocore's XML parser)",
    "importlib": "yes (the libraries above use it)",
    "jmespath": "yes (botocore)",
    "dateutil": "yes (botocore)",
}


def _importtime(code: str) -> tuple[list[tuple[int, int, str]], str]:
    """(self us, cumulative us, module with its indentation) for every import of one fresh run, and
    what the run printed."""
    env = {
        **os.environ,
        "PYTHONPATH": str(LAMBDAS),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env, check=True
    )
    rows = []
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (.*)$", line)
        if match:
            rows.append((int(match.group(1)), int(match.group(2)), match.group(3)))
    return rows, result.stdout


def _total(rows: list[tuple[int, int, str]], module: str) -> int:
    """The cumulative time of ``module`` imported at the top level (no indentation)."""
    return next(cumulative for _self, cumulative, name in reversed(rows) if name == module)


def _subtree(rows: list[tuple[int, int, str]], module: str) -> list[tuple[int, int, str]]:
    """The imports made while importing ``module``: importtime prints them just before it, indented."""
    end = max(i for i, (_s, _c, name) in enumerate(rows) if name == module)
    start = end
    while start > 0 and rows[start - 1][2].startswith(" "):
        start -= 1
    return rows[start : end + 1]


def _by_package(runs: list[list[tuple[int, int, str]]]) -> dict[str, float]:
    per_run: list[dict[str, int]] = []
    for rows in runs:
        sums: dict[str, int] = defaultdict(int)
        for own, _cumulative, name in _subtree(rows, HANDLER):
            sums[name.strip().split(".")[0]] += own
        per_run.append(sums)
    packages = {name for sums in per_run for name in sums}
    return {name: statistics.median(sums.get(name, 0) for sums in per_run) for name in packages}


def _ms(microseconds: float) -> str:
    return f"{microseconds / 1000:,.0f} ms"
