"""``busy-guard status``: who is busy, who is waiting, and what the guard would do about it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

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
    explain,
    group_names,
    positive,
    warn,
)
from busy_guard.decision import Decision, decide
from busy_guard.guard.autoscaling import DESCRIBE_PAGE, WAITING_STATES
from busy_guard.guard.config import GuardConfig
from busy_guard.guard.table import BusyTable
from busy_guard.schema import BusyState

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_dynamodb import DynamoDBClient

JSON_VERSION = 2
JSON_SHAPE = """\
--json prints one object (version 2; keys are only ever added; 2 added refreshes,
observe_only, maintenance and last_maintenance):
  {version, generated_at, region, table, hook, groups: [NAME], observe_only,
   refreshes: [{group, id, status, status_reason, percent_complete, instances_to_update,
     started_at, held_by: [{instance_id, waiting_seconds, leases: [{kind, holder, age_seconds}]}]}],
   instances: [{instance_id, group, lifecycle_state, in_group,
     leases: [{lease_id, kind, holder, live, started_at, heartbeat_at, expires_at,
               age_seconds, expires_in_seconds}],
     legacy: {counter, untracked_ops, last_op_at, last_op_kind, active_leases},
     draining: {since, waiting_seconds, asg, hook} | null,
     released: {at, age_seconds, reason, by} | null,
     maintenance: {since, age_seconds, by, reason, forced} | null,
     last_maintenance: {since, ended_at, by, reason, forced, result} | null,
     guard_would: {action, reason, detail}, problems: [TEXT]}]}
  Times are ISO-8601 UTC strings, durations whole seconds (expires_in_seconds is
  negative once expired); lifecycle_state is null for an instance not in the group;
  refreshes lists each group's active instance refresh (none: no entry); null when they
  could not be described (a warning says why)."""


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
    parser.add_argument(
        "--watch",
        nargs="?",
        type=positive,
        const=DEFAULT_WATCH,
        metavar="SECONDS",
        help=f"redraw every SECONDS (default {DEFAULT_WATCH:.0f}) until interrupted",
    )
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


DEFAULT_WATCH = 5.0
CLEAR_SCREEN = "\033[H\033[2J"
ACTIVE_REFRESH = frozenset({"Pending", "InProgress", "Cancelling", "RollbackInProgress", "Baking"})


@dataclass(frozen=True)
class Refresh:
    """A group's active instance refresh, as DescribeInstanceRefreshes reports it."""

    group: str
    refresh_id: str
    status: str
    status_reason: str
    percent_complete: int | None
    instances_to_update: int | None
    started_at: float | None


def command(ctx: Context) -> int:
    args: argparse.Namespace = ctx.args
    if args.watch is None:
        print(snapshot(ctx))
        return EXIT_OK
    while True:  # until Ctrl-C (main turns it into exit 130)
        text = snapshot(ctx)
        print((CLEAR_SCREEN if sys.stdout.isatty() else "") + text, flush=True)
        time.sleep(args.watch)


def snapshot(ctx: Context) -> str:
    args: argparse.Namespace = ctx.args
    groups = group_names(args.asg) or group_names([os.environ.get(ENV_ASG_NAMES, "")])
    config = ctx.guard_config(groups)
    refreshes: list[Refresh] | None = []
    if groups:
        members = describe_groups(ctx.aws.autoscaling(), groups, ctx.aws.region)
        table = ctx.busy_table(config)
        rows = group_rows(table, members, groups=groups, hook=args.hook, config=config, now=ctx.clock())
        try:
            refreshes = active_refreshes(ctx.aws.autoscaling(), groups)
        except (ClientError, BotoCoreError, ResponseParserError) as error:
            # Not worth failing the rest for (an operator role without the permission, an endpoint
            # that does not serve it): said once, and null in --json.
            warn("status", f"instance refreshes unknown: {explain(error, args)[1]}")
            refreshes = None
    else:
        if not args.json:
            print(f"{PROG} status: no --asg and no ${ENV_ASG_NAMES}: listing the table only", file=sys.stderr)
        rows = table_rows(ctx.aws.dynamodb(), args.table, config=config, now=ctx.clock())
    now = ctx.clock()
    where = {"region": ctx.aws.region, "table": args.table, "hook": args.hook, "groups": groups}
    if args.json:
        document = status_document(rows, now=now, **where)
        document["observe_only"] = config.observe_only
        document["refreshes"] = (
            None if refreshes is None else [_refresh_document(r, rows, now) for r in refreshes]
        )
        return json.dumps(document, indent=2)
    text = render(rows, now=now, **where)
    extra = [_refresh_line(refresh, rows, now) for refresh in refreshes or []]
    if config.observe_only:
        extra.append(
            "observe-only: the guard completes every termination at once; GUARD WOULD is what it logs"
        )
    return text + ("\n\n" + "\n".join(extra) if extra else "")


def active_refreshes(client: AutoScalingClient, groups: Sequence[str]) -> list[Refresh]:
    """Each group's newest instance refresh that is still running (one call per group)."""
    found: list[Refresh] = []
    for group in groups:
        listed = client.describe_instance_refreshes(AutoScalingGroupName=group, MaxRecords=5)
        for refresh in listed.get("InstanceRefreshes", []):
            if refresh.get("Status") not in ACTIVE_REFRESH:
                continue
            started = refresh.get("StartTime")
            found.append(
                Refresh(
                    group=group,
                    refresh_id=refresh.get("InstanceRefreshId", ""),
                    status=refresh.get("Status", ""),
                    status_reason=refresh.get("StatusReason", ""),
                    percent_complete=refresh.get("PercentageComplete"),
                    instances_to_update=refresh.get("InstancesToUpdate"),
                    started_at=started.timestamp() if started is not None else None,
                )
            )
            break
    return found


def _holding(refresh: Refresh, rows: Sequence[Row]) -> list[Row]:
    """The group's instances the guard holds in a termination wait: what the refresh waits on."""
    return [
        row
        for row in rows
        if row.group == refresh.group
        and row.lifecycle_state in WAITING_STATES
        and row.decision.action.value == "WAIT"
    ]


def _refresh_document(refresh: Refresh, rows: Sequence[Row], now: float) -> dict[str, Any]:
    return {
        "group": refresh.group,
        "id": refresh.refresh_id,
        "status": refresh.status,
        "status_reason": refresh.status_reason or None,
        "percent_complete": refresh.percent_complete,
        "instances_to_update": refresh.instances_to_update,
        "started_at": schema.iso(refresh.started_at) if refresh.started_at is not None else None,
        "held_by": [
            {
                "instance_id": row.instance_id,
                "waiting_seconds": round(now - row.state.draining.since)
                if row.state.draining is not None and row.state.draining.since > 0
                else None,
                "leases": [
                    {"kind": lease.kind, "holder": lease.holder, "age_seconds": round(now - lease.started_at)}
                    for lease in row.state.leases
                    if lease.is_live(now, row.clock_skew)
                ],
            }
            for row in _holding(refresh, rows)
        ],
    }


def _refresh_line(refresh: Refresh, rows: Sequence[Row], now: float) -> str:
    progress = f"{refresh.percent_complete}%" if refresh.percent_complete is not None else "?%"
    left = f", {refresh.instances_to_update} to update" if refresh.instances_to_update is not None else ""
    line = f"instance refresh of {refresh.group}: {refresh.status} {progress}{left}"
    holders = _holding(refresh, rows)
    if not holders:
        return line + "; not held by the guard"
    parts = []
    for row in holders:
        kinds = ", ".join(
            f"{lease.kind} ({lease.holder}, {duration(now - lease.started_at)})"
            for lease in row.state.leases
            if lease.is_live(now, row.clock_skew)
        )
        parts.append(f"{row.instance_id}" + (f": {kinds}" if kinds else ""))
    return line + "; held by " + "; ".join(parts)


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
    """Every item of the table (no group given): the table's side of the story only. Under the
    isolated scheme a bare-id item is shown with its instance's ARN item (or alone), never twice."""
    keys = config.keys
    own: dict[str, BusyState] = {}
    companions: dict[str, BusyState] = {}
    for page in client.get_paginator("scan").paginate(TableName=table_name, ConsistentRead=True):
        for item in page.get("Items", []):
            try:
                state = schema.parse_item(item)
            except schema.SchemaError:
                continue
            if keys.is_companion(state.key):
                companions[state.instance_id] = state
            elif keys.owner(state.key) is not None or not keys.isolated:
                own[state.instance_id] = state
    for instance_id, companion in companions.items():
        base = own.get(instance_id, BusyState(instance_id, key=keys.key(instance_id)))
        own[instance_id] = replace(base, legacy=companion)
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
        for state in sorted(own.values(), key=lambda s: s.instance_id)
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
    """One instance, judged by the guard's own decide() with the guard's settings (both of its items,
    where a bare-id companion is read), and shown with the work of both."""
    decision = decide(state, config.decision, now)
    return Row(
        instance_id,
        group,
        lifecycle,
        in_group,
        schema.with_companion_work(state),
        decision,
        config.clock_skew,
    )


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
        "maintenance": None
        if state.maintenance is None
        else {
            "since": schema.iso(state.maintenance.since) if state.maintenance.since > 0 else None,
            "age_seconds": round(now - state.maintenance.since) if state.maintenance.since > 0 else None,
            "by": state.maintenance.by,
            "reason": state.maintenance.reason,
            "forced": state.maintenance.forced,
        },
        "last_maintenance": None
        if state.last_maintenance is None
        else {
            "since": schema.iso(state.last_maintenance.since),
            "ended_at": schema.iso(state.last_maintenance.ended_at),
            "by": state.last_maintenance.by,
            "reason": state.last_maintenance.reason,
            "forced": state.last_maintenance.forced,
            "result": state.last_maintenance.result,
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
    if state.maintenance is not None:
        mark = state.maintenance
        age = duration(now - mark.since) if mark.since > 0 else "?"
        forced = " (forced)" if mark.forced else ""
        why = f": {mark.reason}" if mark.reason else ""
        details.append(f"in maintenance{forced} for {age} by {mark.by or '?'}{why}; new leases are refused")
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
