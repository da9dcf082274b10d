"""``busy-guard``: the operator CLI (console script ``busy-guard = busy_guard.cli:main``).

    busy-guard status  [--asg NAME ...] [--table NAME] [--json]
    busy-guard release INSTANCE_ID [--asg NAME] [--reason TEXT] [--yes]
    busy-guard run     [--kind KIND] [--instance-id ID] [--on-draining {refuse,warn}] -- CMD ...
    busy-guard drain   (INSTANCE_ID | --asg NAME [--batch N]) [--max-wait 30m] [--force --reason TEXT]
                       [-- CMD ...]
    busy-guard undrain INSTANCE_ID
    busy-guard demo    [--speed FACTOR] [--scenario NAME ...]

The AWS commands take ``--region``, ``--profile`` and ``--endpoint-url`` (passed to boto3) and
``--table``; ``--table``, ``--hook`` and ``--asg`` default to the guard's own variables
``BUSY_GUARD_TABLE``, ``BUSY_GUARD_HOOK_NAME`` and ``BUSY_GUARD_ASG_NAMES``. ``status`` judges every
instance with the guard's own ``decide`` and the guard's ``BUSY_GUARD_*`` settings where set.

Exit codes:
    0    success
    1    unexpected error (AWS unreachable, an AWS error not listed below, a bug)
    2    bad usage or configuration: bad arguments, missing table, unknown group, missing
         credentials or region; ``release`` not confirmed
    3    ``release``: nothing to release (no lifecycle action of our hook is pending);
         ``undrain``: no maintenance mark
    4    ``drain``: another drain holds the instance
    75   ``run``: refused, the instance is draining for termination (EX_TEMPFAIL)
    124  ``drain``: ``--max-wait`` passed with work still running; the mark is cleared
    126  ``run``/``drain``: the command cannot be executed; 127: the command was not found
    130  interrupted (143: SIGTERM); ``drain`` clears its mark first
    N    ``run``/``drain``: the command's own exit status; 128+N when it was killed by signal N

Errors are one line on stderr; ``--debug`` adds the traceback. Only ``demo`` imports the sandbox
(and so moto), and only when it runs.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import boto3

from busy_guard.cli import demo, drain, release, run, status
from busy_guard.cli.common import (
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    CliError,
    Context,
    Formatter,
    Parser,
    aws_options,
    configure_logging,
    explain,
    hook_option,
)

__all__ = ["build_parser", "main"]


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        formatter_class=Formatter,
        description=(
            "Keep EC2 Auto Scaling from terminating an instance in the middle of stateful work:\n"
            "operator commands for the busy table and the guard's lifecycle hook.\n"
            f"'{PROG} COMMAND --help' tells more about each command."
        ),
        epilog=(
            "examples:\n"
            "  busy-guard status --asg graph-db\n"
            "  busy-guard release i-0123456789abcdef0 --asg graph-db --reason 'stuck load, INC-42'\n"
            "  busy-guard run --kind nightly_backfill -- ./backfill.sh --all\n"
            "  busy-guard drain --asg graph-db --max-wait 30m -- ./restart-containers.sh\n"
            "  busy-guard demo\n\n" + EXIT_CODES_HELP
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    aws, hook = aws_options(), hook_option()
    status.add_parser(commands, aws=aws, hook=hook)
    release.add_parser(commands, aws=aws, hook=hook)
    run.add_parser(commands, aws=aws)
    drain.add_parser(commands, aws=aws)
    demo.add_parser(commands)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("busy-guard")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def main(
    argv: Sequence[str] | None = None,
    *,
    session: boto3.Session | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Run one command and return its exit code (the console script exits with it).

    ``session`` and ``clock`` are for tests and the sandbox: every client then comes from
    ``session`` (default: a new one from ``--profile`` / ``--region``) and every age from ``clock``.
    """
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is CMD, parsed by nobody: argparse would otherwise take the
    # command's first word for drain's optional INSTANCE_ID.
    split = words.index("--") if "--" in words else len(words)
    try:
        args = parser.parse_args(words[:split])
        if split < len(words):
            if not hasattr(args, "cmd"):
                parser.error(f"'{args.command}' takes no command after --")
            args.cmd = words[split + 1 :]
    except SystemExit as done:  # --help (0) or a usage error (2, already printed as one line)
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    configure_logging(debug, args.command)
    handler: Callable[[Context], int] = args.handler
    try:
        return handler(Context(args, session, clock))
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`busy-guard status | head`): nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as error:
        code, message = explain(error, args)
        if debug:
            traceback.print_exc()
        elif code == EXIT_ERROR and not isinstance(error, CliError):
            message += " (--debug shows the traceback)"
        print(f"{PROG} {args.command}: {message}", file=sys.stderr)
        return code
