"""``busy-guard status``: who is busy, who is waiting, and what the guard would do about it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from busy_guard import schema
from busy_guard.cli.common import (
    ENV_ASG_NAMES,
    EXIT_OK,
    PROG,
    CliError,
    Context,
    Formatter,
    Parser,
    duration,
    epilog,
    group_names,
)
from busy_guard.decision import Decision, decide
from busy_guard.guard.autoscaling import DESCRIBE_PAGE, WAITING_STATES
from busy_guard.guard.config import GuardConfig
from busy_guard.guard.table import BusyTable
from busy_guard.schema import BusyState

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_dynamodb import DynamoDBClient

JSON_VERSION = 1
JSON_SHAPE = """\
--json prints one object (version 1; keys are only ever added):
  {version, generated_at, region, table, hook, groups: [NAME],
   instances: [{instance_id, group, lifecycle_state, in_group,
     leases: [{lease_id, kind, holder, live, started_at, heartbeat_at, expires_at,
               age_seconds, expires_in_seconds}],
     legacy: {counter, untracked_ops, last_op_at, last_op_kind, active_leases},
     draining: {since, waiting_seconds, asg, hook} | null,
     released: {at, age_seconds, reason, by} | null,
     guard_would: {action, reason, detail}, problems: [TEXT]}]}
  Times are ISO-8601 UTC strings, durations whole seconds (expires_in_seconds is
  negative once expired); lifecycle_state is null for an instance not in the group."""


def add_parser(commands: Any, *, aws: Parser, hook: Parser) -> None:
    env_groups = os.environ.get(ENV_ASG_NAMES, "").strip()
    parser: Parser = commands.add_parser(
        "status",
        parents=[aws, hook],
        formatter_class=Formatter,
        help="who is busy, who is waiting, and what the guard would do",
        description=(
            "For every instance of the groups: its lifecycle state, live and expired leases\n"
            "(kind, holder, age), how long it has been draining, any recorded release, and what\n"
            "the guard would decide now (the guard's own decide(), with its BUSY_GUARD_*\n"
            "settings where set). Draining items whose instance has left the group are listed\n"
            "too. Without any group, lists every item of the table (no lifecycle states)."
        ),
        epilog=epilog(
            "busy-guard status --asg graph-db",
            "busy-guard status --asg graph-db,graph-db-canary --json | jq '.instances[]'",
            "BUSY_GUARD_ASG_NAMES=graph-db busy-guard status --region eu-west-1",
            extra=JSON_SHAPE,
        ),
    )
    parser.add_argument(
        "--asg",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a group to show; repeat or comma-separate (default: ${ENV_ASG_NAMES}"
        + (f", now {env_groups}" if env_groups else "")
        + ")",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    parser.set_defaults(handler=command)


@dataclass(frozen=True)
class Row:
    instance_id: str
    group: str | None
    lifecycle_state: str | None
    in_group: bool
    state: BusyState
    decision: Decision
    clock_skew: float


def command(ctx: Context) -> int:
    args: argparse.Namespace = ctx.args
    groups = group_names(args.asg) or group_names([os.environ.get(ENV_ASG_NAMES, "")])
    config = ctx.guard_config(groups)
    if groups:
        members = describe_groups(ctx.aws.autoscaling(), groups, ctx.aws.region)
        table = BusyTable(ctx.aws.dynamodb(), args.table)
        rows = group_rows(table, members, groups=groups, hook=args.hook, config=config, now=ctx.clock())
    else:
        if not args.json:
            print(f"{PROG} status: no --asg and no ${ENV_ASG_NAMES}: listing the table only", file=sys.stderr)
        rows = table_rows(ctx.aws.dynamodb(), args.table, config=config, now=ctx.clock())
    now = ctx.clock()
    if args.json:
        document = status_document(
            rows, now=now, region=ctx.aws.region, table=args.table, hook=args.hook, groups=groups
        )
        print(json.dumps(document, indent=2))
    else:
        print(render(rows, now=now, groups=groups, region=ctx.aws.region, table=args.table, hook=args.hook))
    return EXIT_OK


# --- reading ----------------------------------------------------------------------------------------
def describe_groups(
    client: AutoScalingClient, groups: Sequence[str], region: str
) -> dict[str, list[tuple[str, str]]]:
    """Group -> sorted [(instance id, lifecycle state)]. An unknown group is a usage error."""
    members: dict[str, list[tuple[str, str]]] = {}
    paginator = client.get_paginator("describe_auto_scaling_groups")
    for start in range(0, len(groups), DESCRIBE_PAGE):
        for page in paginator.paginate(AutoScalingGroupNames=list(groups[start : start + DESCRIBE_PAGE])):
            for group in page.get("AutoScalingGroups", []):
                members[group["AutoScalingGroupName"]] = sorted(
                    (instance["InstanceId"], instance.get("LifecycleState", "?"))
                    for instance in group.get("Instances", [])
                )
    missing = [name for name in groups if name not in members]
    if missing:
        raise CliError(f"Auto Scaling group not found in {region}: {', '.join(missing)}")
    return members


def group_rows(
    table: BusyTable,
    members: dict[str, list[tuple[str, str]]],
    *,
    groups: Sequence[str],
    hook: str,
    config: GuardConfig,
    now: float,
) -> list[Row]:
    """The groups' instances, then the draining items of these groups whose instance has left."""
    listed = [(iid, group, lifecycle) for group in groups for iid, lifecycle in members[group]]
    states = table.get_many(iid for iid, _, _ in listed)
    draining = table.draining_items()
    rows = [
        _row(iid, group=group, lifecycle=lifecycle, in_group=True, state=states[iid], config=config, now=now)
        for iid, group, lifecycle in listed
    ]
    present = {iid for iid, _, _ in listed}
    for iid in sorted(draining):
        mark = draining[iid].draining
        assert mark is not None
        if iid in present or mark.asg not in (*groups, "") or mark.hook not in ("", hook):
            continue
        rows.append(
            _row(
                iid,
                group=mark.asg or None,
                lifecycle=None,
                in_group=False,
                state=draining[iid],
                config=config,
                now=now,
            )
        )
    return rows


def table_rows(client: DynamoDBClient, table_name: str, *, config: GuardConfig, now: float) -> list[Row]:
    """Every item of the table (no group given): the table's side of the story only."""
    states: list[BusyState] = []
    for page in client.get_paginator("scan").paginate(TableName=table_name, ConsistentRead=True):
        for item in page.get("Items", []):
            try:
                states.append(schema.parse_item(item))
            except schema.SchemaError:
                continue
    return [
        _row(
            state.instance_id,
            group=(state.draining.asg or None) if state.draining else None,
            lifecycle=None,
            in_group=False,
            state=state,
            config=config,
            now=now,
        )
        for state in sorted(states, key=lambda s: s.instance_id)
    ]


def _row(
    instance_id: str,
    *,
    group: str | None,
    lifecycle: str | None,
    in_group: bool,
    state: BusyState,
    config: GuardConfig,
    now: float,
) -> Row:
    """One instance, judged by the guard's own decide() with the guard's settings."""
    decision = decide(state, config.decision, now)
    return Row(instance_id, group, lifecycle, in_group, state, decision, config.clock_skew)


# --- JSON -----------------------------------------------------------------------------------------------
def status_document(
    rows: Sequence[Row], *, now: float, region: str, table: str, hook: str, groups: Sequence[str]
) -> dict[str, Any]:
    """The ``--json`` document; its shape is ``JSON_SHAPE``."""
    return {
        "version": JSON_VERSION,
        "generated_at": schema.iso(now),
        "region": region,
        "table": table,
        "hook": hook,
        "groups": list(groups),
        "instances": [_row_document(row, now) for row in rows],
    }


def _row_document(row: Row, now: float) -> dict[str, Any]:
    state, decision = row.state, row.decision
    draining, released = state.draining, state.released
    known_since = draining is not None and draining.since > 0
    return {
        "instance_id": row.instance_id,
        "group": row.group,
        "lifecycle_state": row.lifecycle_state,
        "in_group": row.in_group,
        "leases": [
            {
                "lease_id": lease.lease_id,
                "kind": lease.kind,
                "holder": lease.holder,
                "live": lease.is_live(now, row.clock_skew),
                "started_at": schema.iso(lease.started_at),
                "heartbeat_at": schema.iso(lease.heartbeat_at),
                "expires_at": schema.iso(lease.expires_at),
                "age_seconds": round(now - lease.started_at),
                "expires_in_seconds": round(lease.expires_at - now),
            }
            for lease in state.leases
        ],
        "legacy": {
            "counter": state.counter,
            "untracked_ops": max(state.untracked_ops, 0),
            "last_op_at": schema.iso(state.last_op_at) if state.last_op_at is not None else None,
            "last_op_kind": state.last_op_kind,
            "active_leases": [lease.raw for lease in state.legacy_leases],
        },
        "draining": None
        if draining is None
        else {
            "since": schema.iso(draining.since) if known_since else None,
            "waiting_seconds": round(now - draining.since) if known_since else None,
            "asg": draining.asg or None,
            "hook": draining.hook or None,
        },
        "released": None
        if released is None
        else {
            "at": schema.iso(released.at),
            "age_seconds": round(now - released.at),
            "reason": released.reason,
            "by": released.by,
        },
        "guard_would": {
            "action": decision.action.value,
            "reason": decision.reason.value,
            "detail": decision.detail,
        },
        "problems": list(state.problems),
    }


# --- the human table ------------------------------------------------------------------------------------
HEADER = ("INSTANCE", "GROUP", "LIFECYCLE", "DRAINING", "GUARD WOULD")


def render(
    rows: Sequence[Row], *, now: float, groups: Sequence[str], region: str, table: str, hook: str
) -> str:
    scope = f"group {', '.join(groups)}" if groups else "all items"
    lines = [f"{scope} | table {table} | hook {hook} | {region} | {schema.iso(now)}", ""]
    if not rows:
        lines.append("no instances" if groups else "the table is empty")
        return "\n".join(lines)
    cells = [
        (
            row.instance_id,
            row.group or "-",
            row.lifecycle_state or ("not in group" if groups else "-"),
            _draining_cell(row.state, now),
            f"{row.decision.action.value} ({row.decision.reason.value})",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (HEADER, *cells)) for i in range(len(HEADER) - 1)]

    def line(values: Sequence[str]) -> str:
        padded = [value.ljust(width) for value, width in zip(values, widths, strict=False)]
        return "  ".join([*padded, values[-1]])

    lines.append(line(HEADER))
    for row, values in zip(rows, cells, strict=True):
        lines.append(line(values))
        lines.extend(f"    {detail}" for detail in _details(row, now, groups))
    lines.extend(["", _summary(rows, groups)])
    return "\n".join(lines)


def _draining_cell(state: BusyState, now: float) -> str:
    if state.draining is None:
        return "-"
    if state.draining.since <= 0:
        return "yes (since ?)"
    return f"for {duration(now - state.draining.since)}"


def _details(row: Row, now: float, groups: Sequence[str]) -> list[str]:
    state = row.state
    details = []
    for lease in state.leases:
        left = lease.expires_at - now
        if left > 0:
            expiry = f"expires in {duration(left)}"
        elif lease.is_live(now, row.clock_skew):
            expiry = (
                f"expired {duration(left)} ago, still live within the {duration(row.clock_skew)} clock skew"
            )
        else:
            expiry = f"EXPIRED {duration(left)} ago"
        details.append(
            f"lease {lease.kind} ({lease.holder}): age {duration(now - lease.started_at)}, {expiry}"
        )
    if state.untracked_ops > 0:
        last = (
            f"last op {duration(now - state.last_op_at)} ago" if state.last_op_at is not None else "no time"
        )
        details.append(f"legacy counter: {state.untracked_ops} op(s) ({state.last_op_kind or '?'}), {last}")
    details.extend(f"legacy lease {legacy.raw}" for legacy in state.legacy_leases)
    if state.released is not None:
        released = state.released
        details.append(
            f"released {duration(now - released.at)} ago: {released.reason or '?'} (by {released.by or '?'})"
        )
    if groups and not row.in_group:
        details.append("draining, but no longer in the group: the guard records it released (gone)")
    details.extend(f"problem: {problem}" for problem in state.problems)
    return details


def _summary(rows: Sequence[Row], groups: Sequence[str]) -> str:
    busy = sum(1 for row in rows if row.decision.live_leases > 0)
    parts = [f"{len(rows)} instance(s)", f"{busy} busy"]
    if groups:
        waiting = sum(1 for row in rows if row.lifecycle_state in WAITING_STATES)
        parts.append(f"{waiting} in Terminating:Wait")
    parts.append(f"{sum(1 for row in rows if row.state.draining is not None)} draining")
    gone = sum(1 for row in rows if groups and not row.in_group)
    if gone:
        parts.append(f"{gone} gone from the group")
    return ", ".join(parts)
