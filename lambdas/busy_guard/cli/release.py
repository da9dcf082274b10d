"""``busy-guard release``: the emergency override (the replaced system's ``force-ignore-busy``).

Completes our hook with ``CONTINUE`` first and records the release on the item only when that
worked: recording a release for an action that was not pending would make the writers on a
healthy instance refuse new work. The record is unconditional (``release_update`` with
``draining_since=None``), so it lands whether or not the guard has marked the instance draining.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from busy_guard import schema
from busy_guard.cli.common import (
    EXIT_NOTHING_TO_RELEASE,
    EXIT_OK,
    PROG,
    Aws,
    CliError,
    Context,
    Formatter,
    Parser,
    duration,
    epilog,
    explain,
    instance_id,
    warn,
)
from busy_guard.guard.autoscaling import WAITING_STATES, HookResult, LifecycleHooks
from busy_guard.guard.table import TableUnavailableError
from busy_guard.schema import BusyState, Released

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

OPERATOR = "operator"
CONFIRMATION = "yes"
logger = logging.getLogger("busy_guard.cli")


def add_parser(commands: Any, *, aws: Parser, hook: Parser) -> None:
    parser: Parser = commands.add_parser(
        "release",
        parents=[aws, hook],
        formatter_class=Formatter,
        help="emergency override: let a waiting instance terminate now",
        description=(
            "Complete our lifecycle hook for INSTANCE_ID now with CONTINUE, whatever its leases\n"
            "say, and record who did it and why on its item (released.reason 'operator: TEXT',\n"
            "released.by your AWS identity). Auto Scaling then goes on with the termination: work\n"
            "still running there is interrupted. Asks for confirmation unless --yes; without a\n"
            "terminal and without --yes it refuses. When no action of our hook is pending there\n"
            "is nothing to release: it changes nothing and exits 3."
        ),
        epilog=epilog(
            "busy-guard release i-0123456789abcdef0 --asg graph-db --reason 'stuck load, INC-42'",
            "busy-guard release i-0123456789abcdef0 --yes --reason rollback   # group looked up",
        ),
    )
    parser.add_argument("instance_id", type=instance_id, metavar="INSTANCE_ID")
    parser.add_argument("--asg", metavar="NAME", help="the instance's group (default: looked up)")
    parser.add_argument("--reason", default="", metavar="TEXT", help="why: recorded on the item")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.set_defaults(handler=command)


def command(ctx: Context) -> int:
    args = ctx.args
    target: str = args.instance_id
    if not args.yes and not _stdin_is_tty():
        raise CliError("refusing to release without confirmation: stdin is not a terminal (pass --yes)")
    autoscaling = ctx.aws.autoscaling()
    group, lifecycle = find_instance(autoscaling, target, args.asg, ctx.aws.region)
    config = ctx.guard_config([group])
    table = ctx.busy_table(config)
    state: BusyState | None = None
    try:
        state = schema.with_companion_work(table.get(target))
    except TableUnavailableError as error:  # the override must work when the table does not
        warn("release", f"{explain(error, args)[1]}; its leases are unknown")

    if not args.yes:
        print(prompt(target, group=group, lifecycle=lifecycle, hook=args.hook, state=state, now=ctx.clock()))
        print(f"Type '{CONFIRMATION}' to release it: ", end="", flush=True)
        if sys.stdin.readline().strip().lower() != CONFIRMATION:
            raise CliError("not confirmed: nothing was released")

    by = caller_identity(ctx.aws)
    result = LifecycleHooks(autoscaling, args.hook).complete(group, target, "CONTINUE")
    if result is HookResult.NOT_ACTIVE:
        print(
            f"{PROG} release: nothing to release: no lifecycle action of hook {args.hook!r} is pending "
            f"for {target} in {group} ({lifecycle or 'not in the group'}); nothing was changed",
            file=sys.stderr,
        )
        return EXIT_NOTHING_TO_RELEASE
    print(f"released {target}: completed lifecycle hook {args.hook!r} of group {group} with CONTINUE")

    now = ctx.clock()
    reason = f"{OPERATOR}: {args.reason.strip()}" if args.reason.strip() else OPERATOR
    try:
        table.release(
            target, Released(at=now, reason=reason, by=by), ttl=now + config.released_ttl, draining_since=None
        )
    except TableUnavailableError as error:
        warn(
            "release",
            f"the hook is completed, but recording it on the item failed: {explain(error, args)[1]}",
        )
        return EXIT_OK
    print(f"recorded on {args.table}: released.reason {reason!r}, released.by {by!r}")
    return EXIT_OK


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stdin
        return False


def find_instance(
    client: AutoScalingClient, target: str, asg: str | None, region: str
) -> tuple[str, str | None]:
    """(group, lifecycle state, or None when the instance is not in the group)."""
    if asg:
        groups = client.describe_auto_scaling_groups(AutoScalingGroupNames=[asg])["AutoScalingGroups"]
        if not groups:
            raise CliError(f"Auto Scaling group not found in {region}: {asg}")
        for instance in groups[0].get("Instances", []):
            if instance["InstanceId"] == target:
                return asg, instance.get("LifecycleState")
        return asg, None
    found = client.describe_auto_scaling_instances(InstanceIds=[target]).get("AutoScalingInstances", [])
    if not found:
        raise CliError(
            f"nothing to release: {target} is not in any Auto Scaling group in {region} "
            "(--asg NAME tries that group anyway)",
            EXIT_NOTHING_TO_RELEASE,
        )
    return found[0]["AutoScalingGroupName"], found[0].get("LifecycleState")


def prompt(
    target: str, *, group: str, lifecycle: str | None, hook: str, state: BusyState | None, now: float
) -> str:
    """What releasing would do, in the words an operator needs at 3 a.m."""
    lines = [
        f"{target} (group {group}, {lifecycle or 'not in the group'}): complete lifecycle hook "
        f"{hook!r} with CONTINUE, so Auto Scaling goes on with its termination."
    ]
    if lifecycle is not None and lifecycle not in WAITING_STATES:
        lines.append(
            f"It is {lifecycle}, not waiting on a termination: there is probably nothing to release."
        )
    if state is None:
        lines.append("Its leases are unknown: the busy table could not be read.")
        return "\n".join(lines)
    live = [lease for lease in state.leases if lease.is_live(now, 0.0)]
    lines.extend(
        f"BUSY: {lease.kind} ({lease.holder}), running for {duration(now - lease.started_at)}, "
        "will be interrupted."
        for lease in live
    )
    if state.untracked_ops > 0:
        lines.append(f"BUSY: its legacy counter says {state.untracked_ops} operation(s) may be running.")
    if not live and state.untracked_ops <= 0:
        lines.append("No live lease is recorded on it.")
    if state.draining is not None and state.draining.since > 0:
        lines.append(f"The guard has held it for {duration(now - state.draining.since)}.")
    return "\n".join(lines)


def caller_identity(aws: Aws) -> str:
    """Who is releasing: the AWS identity's ARN, else user@host."""
    try:
        arn = aws.sts().get_caller_identity()["Arn"]
        if isinstance(arn, str) and arn:
            return arn
    except Exception as error:  # a name is a nicety: never block the override for it
        logger.debug("sts get-caller-identity failed: %s", error)
    user = os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"
    return f"{user}@{socket.gethostname()}"
