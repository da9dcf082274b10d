"""``busy-guard run -- CMD``: hold a lease while a command runs (cron jobs, non-Python work).

The lease comes from the writer library's sync API, so it behaves exactly like application code:
heartbeats in a daemon thread, every DynamoDB failure logged and swallowed (the command runs
anyway), and a refusal only when the guard is draining the instance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType
from typing import Any

from botocore.exceptions import BotoCoreError

from busy_guard import identity, writer
from busy_guard.cli.common import (
    EXIT_CANNOT_EXECUTE,
    EXIT_DRAINING,
    EXIT_NOT_FOUND,
    PROG,
    Aws,
    CliError,
    Context,
    Formatter,
    Parser,
    epilog,
    explain,
    instance_id,
    new_session,
    warn,
)

FORWARDED = (signal.SIGINT, signal.SIGTERM)


def add_parser(commands: Any, *, aws: Parser) -> None:
    parser: Parser = commands.add_parser(
        "run",
        parents=[aws],
        formatter_class=Formatter,
        help="hold a lease on this instance while a command runs",
        usage=f"{PROG} run [options] -- CMD [ARG ...]",
        description=(
            "Run CMD with a lease on this instance's item, renewed by a heartbeat, so the guard\n"
            "holds a termination of the instance until CMD ends. SIGINT and SIGTERM are passed on\n"
            "to CMD; the exit status is CMD's. The lease never stands in CMD's way: if the table\n"
            "cannot be reached, CMD runs anyway and a warning says so. While the instance is\n"
            "draining for termination it refuses to start CMD (exit 75), unless --on-draining warn.\n"
            "The table's endpoint also honours $BUSY_GUARD_ENDPOINT_URL, as the writer library does."
        ),
        epilog=epilog(
            "busy-guard run -- pg_dump -Fc -f /backup/db.dump db",
            "busy-guard run --kind nightly_backfill -- sh -c './extract && ./load'",
            "busy-guard run --instance-id i-0123456789abcdef0 --on-draining warn -- make reindex",
        ),
    )
    parser.add_argument(
        "--kind", metavar="KIND", help="the lease's kind, shown by status (default: CMD's name)"
    )
    parser.add_argument(
        "--instance-id",
        type=instance_id,
        metavar="ID",
        help="the instance to lease (default: $BUSY_GUARD_INSTANCE_ID, else EC2 instance metadata)",
    )
    parser.add_argument(
        "--on-draining",
        choices=("refuse", "warn"),
        default="refuse",
        help="if the instance is draining: refuse (exit 75; the default) or warn and run without a lease",
    )
    parser.add_argument("cmd", nargs="...", metavar="CMD", help="the command and its arguments, after --")
    parser.set_defaults(handler=command)


def command(ctx: Context) -> int:
    args = ctx.args
    argv: list[str] = list(args.cmd)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise CliError(f"no command to run: {PROG} run [options] -- CMD [ARG ...]")
    kind = args.kind or os.path.basename(argv[0]) or "command"
    lease_on = _instance_id(args.instance_id)
    with SignalForwarder() as forwarder:
        lease = _begin(ctx, kind, lease_on)
        try:
            if forwarder.pending:  # told to stop before the command started: don't start it
                return 128 + forwarder.pending[0]
            try:
                child = subprocess.Popen(argv)
            except FileNotFoundError:
                print(f"{PROG} run: command not found: {argv[0]}", file=sys.stderr)
                return EXIT_NOT_FOUND
            except OSError as error:  # PermissionError, ENOEXEC, ...
                print(f"{PROG} run: cannot execute {argv[0]}: {error.strerror or error}", file=sys.stderr)
                return EXIT_CANNOT_EXECUTE
            forwarder.started(child)
            returncode = child.wait()
        finally:
            writer.end_destructive_op_sync(None, lease)
    return 128 - returncode if returncode < 0 else returncode


def _instance_id(option: str | None) -> str | None:
    """``--instance-id``, else ``$BUSY_GUARD_INSTANCE_ID`` checked as strictly (a usage error naming
    the variable), else None: the writer asks IMDS."""
    if option is not None:
        return option
    from_env = os.environ.get(identity.ENV_INSTANCE_ID, "").strip()
    if not from_env:
        return None
    try:
        return identity.validate_instance_id(from_env, f"${identity.ENV_INSTANCE_ID}")
    except identity.InvalidInstanceIdError as error:
        raise CliError(f"{error} (or pass --instance-id)") from None


def _begin(ctx: Context, kind: str, instance_id: str | None) -> writer.LeaseHandle | None:
    """The lease, or None (the writer has logged why). Raises CliError(75) while draining."""
    args = ctx.args
    endpoint = args.endpoint_url or os.environ.get(writer.ENV_ENDPOINT_URL, "").strip() or None
    try:
        session = ctx.session or new_session(args)
        # The region exactly as the library finds it (AWS_REGION, the profile, then IMDS on EC2):
        # without it, `run` on an instance with no region configured would run CMD unguarded.
        region = args.region or writer.resolve_region(session.region_name, endpoint)
        # The writer's own client settings: short timeouts, one retry, so a dead table costs ~1 s.
        client = Aws(session, endpoint, region).dynamodb(writer.CLIENT_CONFIG)
    except (BotoCoreError, ValueError) as error:
        warn("run", f"{explain(error, args)[1]}; {kind} runs without a lease")
        return None
    try:
        return writer.begin_destructive_op_sync(
            instance_id,
            kind,
            table=args.table,
            on_draining="warn" if args.on_draining == "warn" else "raise",
            client=client,
            clock=ctx.clock,
        )
    except writer.InstanceDrainingError as error:
        raise CliError(f"{error} (--on-draining warn runs it anyway)", EXIT_DRAINING) from None


class SignalForwarder:
    """Passes SIGINT and SIGTERM on to the children; keeps those that arrive before one starts.

    A Ctrl-C typed at the terminal already reaches the child (it is in our foreground process
    group), so such a SIGINT is not sent again: a child that cleans up on the first one must not
    be interrupted by a second.
    """

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []
        self.pending: list[int] = []
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalForwarder:
        for signum in FORWARDED:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        self.pending.append(signum)
        self._flush()

    @property
    def stopped_by(self) -> int | None:
        """The first signal received, or None (``drain`` stops waiting when there is one)."""
        return self.received[0] if self.received else None

    def started(self, child: subprocess.Popen[bytes]) -> None:
        self.children.append(child)
        self._flush()

    def _flush(self) -> None:
        children = list(self.children)
        while children and self.pending:
            try:
                signum = self.pending.pop(0)
            except IndexError:  # a handler that ran in between emptied it
                return
            if signum == signal.SIGINT and _terminal_delivered_it():
                continue
            for child in children:
                if child.poll() is None:
                    child.send_signal(signum)


def _terminal_delivered_it() -> bool:
    """Whether we run in the foreground process group of a terminal (so Ctrl-C hit the child too)."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False
