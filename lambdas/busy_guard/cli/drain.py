"""``busy-guard drain``: maintenance without termination; ``busy-guard undrain``: clear a stuck mark.

The replaced system's rolling restart, made safe: ``drain`` puts a ``maintenance`` mark on the
instance's item (one conditional write, so two drains never both own an instance), after which
every writer refuses new leases exactly as it does for the guard's ``draining``. It waits until no
live lease remains (judged by the guard's own ``decide``), runs CMD, and clears its own mark in a
``finally``: on success, on failure, on timeout and on SIGINT/SIGTERM, which are caught for the whole
run so that a Ctrl-C while waiting is a normal way out, never a skipped cleanup.

The mark is separate from the guard's: the guard never reads it as a termination and ``drain``
never touches ``draining``. A termination that arrives during maintenance is guarded as usual.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from busy_guard import schema
from busy_guard.cli.common import (
    EXIT_CANNOT_EXECUTE,
    EXIT_ERROR,
    EXIT_IN_MAINTENANCE,
    EXIT_NOT_FOUND,
    EXIT_NOTHING_TO_RELEASE,
    EXIT_OK,
    EXIT_TIMEOUT,
    PROG,
    CliError,
    Context,
    Formatter,
    Parser,
    duration,
    epilog,
    explain,
    instance_id,
    positive,
    warn,
)
from busy_guard.cli.release import caller_identity
from busy_guard.cli.run import SignalForwarder
from busy_guard.cli.status import describe_groups
from busy_guard.decision import Action, decide
from busy_guard.guard.autoscaling import IN_SERVICE
from busy_guard.guard.config import GuardConfig
from busy_guard.guard.table import BusyTable, TableUnavailableError
from busy_guard.schema import BusyState, Maintenance
from busy_guard.settings import Env

DEFAULT_MAX_WAIT = 30 * 60.0
DEFAULT_POLL = 10.0
SLEEP_STEP = 0.1  # how quickly a signal ends the wait
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")

RESULT_OK = "ok"
RESULT_TIMEOUT = "timeout"
RESULT_INTERRUPTED = "interrupted"


def wait_time(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1h30m``: seconds, positive."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"not a duration (like 90s, 30m, 2h, 1h30m): {text!r}")
    hours, minutes, seconds = (float(part) if part else 0.0 for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return total


def add_parser(commands: Any, *, aws: Parser) -> None:
    parser: Parser = commands.add_parser(
        "drain",
        parents=[aws],
        formatter_class=Formatter,
        help="maintenance without termination: wait until idle, run CMD, let work resume",
        usage=f"{PROG} drain (INSTANCE_ID | --asg NAME [--batch N]) [options] [-- CMD [ARG ...]]",
        description=(
            "Mark INSTANCE_ID in maintenance, so writers refuse new leases (as they do while the\n"
            "guard drains it for a termination), wait until no live lease remains, run CMD (a\n"
            "container restart, an SSM command) with BUSY_GUARD_INSTANCE_ID set to the instance,\n"
            "then clear the mark. The mark is always cleared: on success, on failure, on timeout\n"
            "and on Ctrl-C/SIGTERM. While waiting, a line names what still runs and for how long.\n"
            "--force proceeds at once, whatever runs there, and records who and why on the item.\n"
            "--asg rolls through the group's InService instances in instance-id order, one at a\n"
            "time (or --batch N at a time), and stops at the first failure. The mark is not a\n"
            "termination: the guard ignores it, and a termination arriving meanwhile is still held\n"
            "while its leases live."
        ),
        epilog=epilog(
            "busy-guard drain i-0123456789abcdef0 -- ssh graph-1 sudo systemctl restart graph",
            "busy-guard drain i-0123456789abcdef0 --max-wait 2h   # only wait, then let work resume",
            "busy-guard drain --asg graph-db --max-wait 30m -- ./restart-containers.sh",
            "busy-guard drain i-0123456789abcdef0 --force --reason 'hung load, INC-42' -- ./restart.sh",
            extra=(
                "drain exit codes:\n"
                "  0    drained (or forced) and CMD, if any, succeeded\n"
                "  4    another drain holds the instance (busy-guard undrain clears a stuck mark)\n"
                "  124  --max-wait passed with work still running: CMD not run, mark cleared\n"
                "  130  interrupted (143 for SIGTERM): mark cleared\n"
                "  N    CMD's own status (128+N when killed by signal N; 126/127 not executable/found)\n"
                "  A forced drain exits like any other; the override is printed and recorded\n"
                "  (last_maintenance.forced, .by, .reason)."
            ),
        ),
    )
    parser.add_argument("instance_id", nargs="?", type=instance_id, metavar="INSTANCE_ID")
    parser.add_argument("--asg", metavar="NAME", help="roll through this group's InService instances")
    parser.add_argument(
        "--batch", type=int, default=1, metavar="N", help="with --asg: instances drained at once (default 1)"
    )
    parser.add_argument(
        "--max-wait",
        type=wait_time,
        default=DEFAULT_MAX_WAIT,
        metavar="TIME",
        help="give up waiting after TIME (90s, 30m, 2h; default 30m): exit 124",
    )
    parser.add_argument("--force", action="store_true", help="do not wait for running work (recorded)")
    parser.add_argument("--reason", default="", metavar="TEXT", help="why: recorded on the item")
    parser.add_argument(
        "--poll", type=positive, default=DEFAULT_POLL, metavar="SECONDS", help="re-read interval (default 10)"
    )
    parser.set_defaults(handler=command, cmd=[])

    undrain: Parser = commands.add_parser(
        "undrain",
        parents=[aws],
        formatter_class=Formatter,
        help="clear a stuck maintenance mark (drain killed with SIGKILL, a lost host)",
        description=(
            "Remove the maintenance mark of INSTANCE_ID, so writers may start work there again,\n"
            "and record that it was cleared. Only the maintenance mark: a termination's draining\n"
            "mark is the guard's and is never touched. Exits 3 when there is no mark to clear."
        ),
        epilog=epilog("busy-guard undrain i-0123456789abcdef0"),
    )
    undrain.add_argument("instance_id", type=instance_id, metavar="INSTANCE_ID")
    undrain.set_defaults(handler=undrain_command)


# --- drain ----------------------------------------------------------------------------------------
@dataclass
class Run:
    """One drain run's collaborators: the table, the judge, the clock, and where signals land."""

    table: BusyTable
    config: GuardConfig
    clock: Callable[[], float]
    signals: SignalForwarder
    by: str
    args: argparse.Namespace

    def say(self, message: str) -> None:
        print(f"{PROG} drain: {message}", file=sys.stderr, flush=True)


def command(ctx: Context) -> int:
    args = ctx.args
    if args.batch < 1:
        raise CliError("--batch must be at least 1")
    if bool(args.instance_id) == bool(args.asg):
        raise CliError("give either INSTANCE_ID or --asg NAME")
    if args.batch > 1 and not args.asg:
        raise CliError("--batch needs --asg")
    if args.force and args.asg:
        raise CliError("--force is for one instance; a whole group is never forced")
    if args.asg:
        members = describe_groups(ctx.aws.autoscaling(), [args.asg], ctx.aws.region)[args.asg]
        targets = [iid for iid, lifecycle in members if lifecycle == IN_SERVICE]
        if not targets:
            raise CliError(f"group {args.asg} has no InService instance to drain")
    else:
        targets = [args.instance_id]
    config = ctx.guard_config([args.asg] if args.asg else [])
    table = ctx.busy_table(config)
    with SignalForwarder() as signals:
        run = Run(table, config, ctx.clock, signals, caller_identity(ctx.aws), args)
        batches = [targets[i : i + args.batch] for i in range(0, len(targets), args.batch)]
        for number, batch in enumerate(batches, 1):
            if args.asg:
                run.say(f"[{number}/{len(batches)}] {', '.join(batch)}")
            code = drain_batch(run, batch)
            if code != EXIT_OK:
                left = [iid for later in batches[number:] for iid in later]
                if left:
                    run.say(f"stopping at the first failure (exit {code}); not drained: {', '.join(left)}")
                return code
        if args.asg:
            run.say(f"all {len(targets)} instance(s) of {args.asg} drained")
    return EXIT_OK


def drain_batch(run: Run, batch: Sequence[str]) -> int:
    """Mark, wait, run CMD; then clear every mark taken, whatever happened in between."""
    marks: dict[str, Maintenance] = {}
    result, code = "error", EXIT_ERROR  # what the record says if an exception ends the run
    try:
        result, code = _drain_marked(run, batch, marks)
    finally:
        if run.signals.stopped_by is not None and result == RESULT_OK:
            result = RESULT_INTERRUPTED
        cleared = clear_marks(run, marks, result)
    return EXIT_ERROR if not cleared and code == EXIT_OK else code


def _drain_marked(run: Run, batch: Sequence[str], marks: dict[str, Maintenance]) -> tuple[str, int]:
    for iid in batch:
        mark = Maintenance(
            since=run.clock(),
            by=run.by,
            reason=run.args.reason.strip(),
            token=uuid.uuid4().hex,
            forced=run.args.force,
        )
        taken, state = run.table.begin_maintenance(iid, mark)
        if not taken:
            other = state.maintenance
            holder = f" since {schema.iso(other.since)} by {other.by or '?'}" if other and other.since else ""
            raise CliError(
                f"{iid} is already in maintenance{holder} ({PROG} undrain {iid} clears a stuck mark)",
                EXIT_IN_MAINTENANCE,
            )
        marks[iid] = mark
        if state.draining is not None:
            run.say(f"{iid} is terminating (the guard holds it): its draining mark is left to the guard")
    verb = "forced into" if run.args.force else "in"
    run.say(f"{', '.join(batch)}: {verb} maintenance; new leases are refused")
    if run.args.force:
        report_forced(run, batch)
    else:
        stopped = wait_until_idle(run, batch)
        if stopped is not None:
            return stopped
    if run.signals.stopped_by is not None:
        return RESULT_INTERRUPTED, 128 + run.signals.stopped_by
    code = run_commands(run, batch)
    return (RESULT_OK if code == EXIT_OK else f"exit {code}"), code


def wait_until_idle(run: Run, batch: Sequence[str]) -> tuple[str, int] | None:
    """None once no instance of the batch has live work; else (result, exit code) of a timeout or
    a signal."""
    started = run.clock()
    while True:
        now = run.clock()
        states = run.table.get_many(batch)
        busy = {iid: state for iid, state in states.items() if _busy(state, run.config, now)}
        if not busy:
            run.say(f"{', '.join(batch)}: no live lease after {duration(now - started)}")
            return None
        waited = now - started
        if waited >= run.args.max_wait:
            for iid, state in busy.items():
                run.say(f"timed out after {duration(waited)}: {iid} still runs {_running(state, run, now)}")
            return RESULT_TIMEOUT, EXIT_TIMEOUT
        for iid, state in busy.items():
            run.say(
                f"waiting for {iid}: {_running(state, run, now)}; "
                f"waited {duration(waited)} of {duration(run.args.max_wait)}"
            )
        deadline = time.monotonic() + min(run.args.poll, max(run.args.max_wait - waited, SLEEP_STEP))
        while time.monotonic() < deadline:
            if run.signals.stopped_by is not None:
                run.say(f"interrupted after {duration(run.clock() - started)} of waiting")
                return RESULT_INTERRUPTED, 128 + run.signals.stopped_by
            time.sleep(SLEEP_STEP)


def _busy(state: BusyState, config: GuardConfig, now: float) -> bool:
    """Live work by the guard's own rule, without the guard's termination clock: a drain judges
    leases, never how long a termination has waited."""
    return decide(replace(state, draining=None), config.decision, now).action is Action.WAIT


def _running(state: BusyState, run: Run, now: float) -> str:
    parts = [
        f"{lease.kind} ({lease.holder}) for {duration(now - lease.started_at)}"
        for lease in state.leases
        if lease.is_live(now, run.config.clock_skew)
    ]
    if state.untracked_ops > 0:
        parts.append(f"{state.untracked_ops} legacy op(s) ({state.last_op_kind or '?'})")
    parts.extend(f"legacy lease {legacy.kind}" for legacy in state.legacy_leases)
    return ", ".join(parts) or "work of unknown age"


def report_forced(run: Run, batch: Sequence[str]) -> None:
    now = run.clock()
    for iid, state in run.table.get_many(batch).items():
        if _busy(state, run.config, now):
            run.say(f"forced: not waiting for {iid}: {_running(state, run, now)} (recorded, by {run.by})")


def run_commands(run: Run, batch: Sequence[str]) -> int:
    """CMD once per instance of the batch, at once; the first failure's status, in batch order."""
    argv: list[str] = list(run.args.cmd)
    if not argv:
        return EXIT_OK
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    for iid in batch:
        try:
            child = subprocess.Popen(argv, env={**os.environ, Env.INSTANCE_ID: iid})
        except FileNotFoundError:
            run.say(f"command not found: {argv[0]}")
            return _wait_all(children, EXIT_NOT_FOUND)
        except OSError as error:
            run.say(f"cannot execute {argv[0]}: {error.strerror or error}")
            return _wait_all(children, EXIT_CANNOT_EXECUTE)
        run.signals.started(child)
        children.append((iid, child))
    code = _wait_all(children, EXIT_OK)
    for iid, child in children:
        status = _status(child.returncode)
        run.say(f"{iid}: {argv[0]} exited {status}")
    return code


def _wait_all(children: list[tuple[str, subprocess.Popen[bytes]]], code: int) -> int:
    for _iid, child in children:
        status = _status(child.wait())
        if code == EXIT_OK and status != EXIT_OK:
            code = status
    return code


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def clear_marks(run: Run, marks: dict[str, Maintenance], result: str) -> bool:
    """Clear every mark this run took (only if it is still ours). False if any was left."""
    ok = True
    for iid, mark in marks.items():
        try:
            cleared, state = run.table.end_maintenance(iid, mark, ended_at=run.clock(), result=result)
        except TableUnavailableError as error:
            warn(
                "drain",
                f"{iid}: the maintenance mark could not be cleared ({explain(error, run.args)[1]}); "
                f"writers stay refused until `{PROG} undrain {iid}`",
            )
            ok = False
            continue
        if cleared:
            run.say(f"{iid}: maintenance mark cleared ({result})")
        else:
            holder = state.maintenance.by if state.maintenance else "nobody"
            run.say(f"{iid}: the maintenance mark was no longer ours (now: {holder}); left alone")
    return ok


# --- undrain --------------------------------------------------------------------------------------
def undrain_command(ctx: Context) -> int:
    args = ctx.args
    target: str = args.instance_id
    table = ctx.busy_table()
    state = table.get(target)
    mark = state.maintenance
    if mark is None:
        print(f"{PROG} undrain: {target} has no maintenance mark; nothing was changed", file=sys.stderr)
        return EXIT_NOTHING_TO_RELEASE
    by = caller_identity(ctx.aws)
    cleared, _ = table.end_maintenance(target, mark, ended_at=ctx.clock(), result=f"undrain by {by}")
    if not cleared:
        raise CliError(f"{target}: the maintenance mark changed meanwhile (a new drain?); run undrain again")
    age = f"{duration(ctx.clock() - mark.since)} ago" if mark.since > 0 else "at an unknown time"
    why = f": {mark.reason}" if mark.reason else ""
    print(f"cleared the maintenance mark of {target} (taken {age} by {mark.by or '?'}{why})")
    if state.draining is not None:
        print(f"{target} is also draining for a termination: that mark is the guard's and stays")
    return EXIT_OK
