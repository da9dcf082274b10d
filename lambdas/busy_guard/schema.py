"""The busy table: every attribute name, the parsed state of an item, and the update expressions.

Pure: no I/O and no boto3. Items are in DynamoDB's wire format (``{"S": "..."}``) because the writer,
the guard (low-level clients) and the stream records all speak it. The layout is fixed by DESIGN.md:

    instance_id              S   partition key: the instance ARN (isolated) or the bare id (legacy)
    leases                   M   lease id -> {kind, holder, started_at, heartbeat_at, expires_at}
    active_destructive_ops   N   kept equal to the number of leases (counter-only readers)
    last_destructive_op_at   S   ISO-8601 UTC of the last begin/end/heartbeat
    last_destructive_op_kind S
    draining                 M   {since, asg, hook, heartbeat_at}: the guard has looked; no new leases
    released                 M   {at, reason, by}: the hook was completed
    maintenance              M   {since, by, reason, token, forced}: an in-place drain; no new leases
    last_maintenance         M   {since, ended_at, by, reason, forced, result}: the last drain's record
    expires_at               N   TTL, set on release, removed by begin
    active_leases            SS  legacy "<iso started_at>|<kind>|<id>", read only
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from busy_guard import settings
from busy_guard.keys import instance_id_of

# --- attribute names: the only place they are spelled -------------------------------------------
INSTANCE_ID = "instance_id"
LEASES = "leases"
COUNTER = "active_destructive_ops"
LAST_OP_AT = "last_destructive_op_at"
LAST_OP_KIND = "last_destructive_op_kind"
DRAINING = "draining"
RELEASED = "released"
TTL = "expires_at"
LEGACY_LEASES = "active_leases"
MAINTENANCE = "maintenance"
LAST_MAINTENANCE = "last_maintenance"

# fields of a lease
KIND = "kind"
HOLDER = "holder"
STARTED_AT = "started_at"
HEARTBEAT_AT = "heartbeat_at"
EXPIRES_AT = "expires_at"
# fields of draining / released
SINCE = "since"
ASG = "asg"
HOOK = "hook"
AT = "at"
REASON = "reason"
BY = "by"
CONFIRMED_AT = "confirmed_at"
RECHECKED_AT = "rechecked_at"
# fields of maintenance / last_maintenance
TOKEN = "token"  # noqa: S105 - an attribute name: the drain run's id, not a secret
FORCED = "forced"
ENDED_AT = "ended_at"
RESULT = "result"

Item = Mapping[str, Any]
"""A busy-table item in DynamoDB wire format."""
UpdateRequest = dict[str, Any]
"""Keyword arguments for ``UpdateItem`` (without TableName and Key)."""


# --- the parsed state ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Lease:
    lease_id: str
    kind: str
    holder: str
    started_at: float
    heartbeat_at: float
    expires_at: float

    def is_live(self, now: float, clock_skew: float) -> bool:
        return self.expires_at + clock_skew > now


@dataclass(frozen=True)
class Draining:
    since: float
    asg: str
    hook: str
    # When the guard last heartbeat the hook (recorded after the call): heartbeats only when due.
    heartbeat_at: float | None = None


@dataclass(frozen=True)
class Released:
    at: float
    reason: str
    by: str
    # When a later tick saw that no action of ours was pending any more: stop retrying.
    confirmed_at: float | None = None


@dataclass(frozen=True)
class Maintenance:
    """An in-place drain (``busy-guard drain``): writers refuse new leases, as for ``draining``, but
    the guard never reads it as a termination and never clears it. ``token`` names one drain run:
    only that run (or ``undrain``, which reads it first) removes the mark."""

    since: float
    by: str
    reason: str
    token: str
    forced: bool = False


@dataclass(frozen=True)
class MaintenanceRecord:
    """What the last drain did, left on the item when its mark is cleared (who, why, forced, result)."""

    since: float
    ended_at: float
    by: str
    reason: str
    forced: bool
    result: str


@dataclass(frozen=True)
class LegacyLease:
    """One entry of the legacy ``active_leases`` string set."""

    raw: str
    started_at: float | None
    kind: str
    lease_id: str


@dataclass(frozen=True)
class BusyState:
    """Everything the guard and the CLI need to know about one instance's item.

    ``instance_id`` is the bare id whatever the key scheme; ``key`` is the item's partition key as
    stored (the instance ARN under the isolated scheme). ``legacy`` is the companion item keyed by
    the bare id, read beside an ARN-keyed item while legacy writers may exist: its work counts too
    (``decide``), and a release proves it too (``Proof.legacy``)."""

    instance_id: str
    exists: bool = False
    leases: tuple[Lease, ...] = ()
    corrupt_leases: int = 0
    # A counter or legacy lease set present but unreadable: work of unknown age, not "no work".
    unreadable_markers: int = 0
    counter: int | None = None
    last_op_at: float | None = None
    last_op_at_raw: str | None = None
    last_op_kind: str | None = None
    draining: Draining | None = None
    released: Released | None = None
    maintenance: Maintenance | None = None
    last_maintenance: MaintenanceRecord | None = None
    expires_at: float | None = None
    legacy_leases: tuple[LegacyLease, ...] = ()
    problems: tuple[str, ...] = field(default=())
    key: str = ""
    legacy: BusyState | None = None

    @property
    def untracked_ops(self) -> int:
        """Operations counted by the counter but not described by a readable lease.

        A legacy writer bumps only the counter; a corrupted lease entry is counted but unreadable.
        Both are judged by the legacy rule (the counter's timestamp against the stale window).
        Negative means the counter is below the lease count: harmless, reported as a problem.
        """
        if self.counter is None:
            return self.corrupt_leases + self.unreadable_markers
        return max(self.counter - len(self.leases), self.corrupt_leases) + self.unreadable_markers

    @property
    def is_draining(self) -> bool:
        return self.draining is not None

    @property
    def is_released(self) -> bool:
        """True when the guard finished with this instance's current termination."""
        return self.released is not None and self.draining is None


def with_companion_work(state: BusyState) -> BusyState:
    """What the CLI (``status``, ``release``) shows of an instance whose work may sit on two items:
    every lease of either, and the legacy markers of whichever item has them (the bare-id one first:
    they are its)."""
    companion = state.legacy
    if companion is None:
        return state
    markers = companion if companion.counter is not None or companion.legacy_leases else state
    return replace(
        state,
        leases=tuple(sorted((*state.leases, *companion.leases), key=lambda lease: lease.lease_id)),
        corrupt_leases=state.corrupt_leases + companion.corrupt_leases,
        counter=markers.counter,
        unreadable_markers=state.unreadable_markers + companion.unreadable_markers,
        last_op_at=markers.last_op_at,
        last_op_at_raw=markers.last_op_at_raw,
        last_op_kind=markers.last_op_kind,
        legacy_leases=companion.legacy_leases or state.legacy_leases,
        problems=(*state.problems, *companion.problems),
        exists=state.exists or companion.exists,
        legacy=None,
    )


class SchemaError(ValueError):
    """An item that is not a busy-table item at all (no key, not a map)."""


def parse_item(item: Item | None, instance_id: str = "") -> BusyState:
    """Parse any item of the busy table. Never raises for bad attribute values: each unreadable
    part is skipped and named in ``problems`` so the caller can log it once."""
    if not item:
        return BusyState(instance_id=instance_id)
    if not isinstance(item, Mapping):
        raise SchemaError(f"item is {type(item).__name__}, expected a map of attributes")
    problems: list[str] = []
    key = _string(item.get(INSTANCE_ID))
    if key is None and not instance_id:
        raise SchemaError(f"item has no {INSTANCE_ID!r} string attribute")
    resolved_id = instance_id_of(key) if key is not None else instance_id

    leases, corrupt = _parse_leases(item.get(LEASES), problems)
    counter = _parse_counter(item.get(COUNTER), problems)
    legacy_leases = _parse_legacy_leases(item.get(LEGACY_LEASES), problems)
    unreadable = int(item.get(COUNTER) is not None and counter is None)
    unreadable += int(item.get(LEGACY_LEASES) is not None and not legacy_leases)
    last_raw = _string(item.get(LAST_OP_AT))
    last_at = parse_iso(last_raw) if last_raw is not None else None
    if last_raw is not None and last_at is None:
        problems.append(f"{LAST_OP_AT} is not an ISO-8601 time: {last_raw[:64]!r}")
    if counter is not None and counter < 0:
        problems.append(f"{COUNTER} is negative ({counter}): treated as idle")
    elif counter is not None and counter < len(leases):
        problems.append(f"{COUNTER} ({counter}) is below the number of leases ({len(leases)})")

    return BusyState(
        instance_id=resolved_id,
        exists=True,
        leases=leases,
        corrupt_leases=corrupt,
        counter=counter,
        last_op_at=last_at,
        last_op_at_raw=last_raw,
        last_op_kind=_string(item.get(LAST_OP_KIND)),
        draining=_parse_draining(item.get(DRAINING), problems),
        released=_parse_released(item.get(RELEASED), problems),
        maintenance=_parse_maintenance(item.get(MAINTENANCE), problems),
        last_maintenance=_parse_last_maintenance(item.get(LAST_MAINTENANCE)),
        expires_at=_number(item.get(TTL)),
        legacy_leases=legacy_leases,
        unreadable_markers=unreadable,
        problems=tuple(problems),
        key=key if key is not None else "",
    )


def _parse_leases(value: Any, problems: list[str]) -> tuple[tuple[Lease, ...], int]:
    if value is None:
        return (), 0
    entries = _map(value)
    if entries is None:
        problems.append(f"{LEASES} is not a map: every lease in it is unreadable")
        return (), 1
    leases: list[Lease] = []
    corrupt = 0
    for lease_id, raw in entries.items():
        fields = _map(raw)
        expires = _number(fields.get(EXPIRES_AT)) if fields is not None else None
        if fields is None or expires is None:
            corrupt += 1
            problems.append(f"lease {str(lease_id)[:64]!r} has no readable {EXPIRES_AT}")
            continue
        started = _number(fields.get(STARTED_AT))
        heartbeat = _number(fields.get(HEARTBEAT_AT))
        leases.append(
            Lease(
                lease_id=str(lease_id),
                kind=_string(fields.get(KIND)) or "unknown",
                holder=_string(fields.get(HOLDER)) or "unknown",
                started_at=started if started is not None else expires,
                heartbeat_at=heartbeat if heartbeat is not None else (started or expires),
                expires_at=expires,
            )
        )
    # Sorted so that nothing downstream depends on the map's order.
    return tuple(sorted(leases, key=lambda lease: lease.lease_id)), corrupt


def _parse_counter(value: Any, problems: list[str]) -> int | None:
    if value is None:
        return None
    number = _number(value)
    if number is None:
        problems.append(f"{COUNTER} is not a number: judged like a legacy marker, by {LAST_OP_AT}")
        return None
    return int(number)


def _parse_draining(value: Any, problems: list[str]) -> Draining | None:
    if value is None:
        return None
    fields = _map(value)
    since = _number(fields.get(SINCE)) if fields is not None else None
    if fields is None or since is None:
        # Still draining: an unreadable mark must never let new leases look welcome.
        problems.append(f"{DRAINING} is unreadable; treated as draining since the epoch")
        return Draining(since=0.0, asg="", hook="")
    return Draining(
        since=since,
        asg=_string(fields.get(ASG)) or "",
        hook=_string(fields.get(HOOK)) or "",
        heartbeat_at=_number(fields.get(HEARTBEAT_AT)),
    )


def _parse_released(value: Any, problems: list[str]) -> Released | None:
    if value is None:
        return None
    fields = _map(value)
    at = _number(fields.get(AT)) if fields is not None else None
    if fields is None or at is None:
        problems.append(f"{RELEASED} is unreadable")
        return Released(at=0.0, reason="unknown", by="unknown")
    return Released(
        at=at,
        reason=_string(fields.get(REASON)) or "",
        by=_string(fields.get(BY)) or "",
        confirmed_at=_number(fields.get(CONFIRMED_AT)),
    )


def _parse_maintenance(value: Any, problems: list[str]) -> Maintenance | None:
    if value is None:
        return None
    fields = _map(value)
    since = _number(fields.get(SINCE)) if fields is not None else None
    if fields is None or since is None:
        # Like an unreadable draining mark: writers keep refusing; `undrain` can still clear it.
        problems.append(f"{MAINTENANCE} is unreadable; treated as in maintenance since the epoch")
        return Maintenance(since=0.0, by="", reason="", token=_string((fields or {}).get(TOKEN)) or "")
    return Maintenance(
        since=since,
        by=_string(fields.get(BY)) or "",
        reason=_string(fields.get(REASON)) or "",
        token=_string(fields.get(TOKEN)) or "",
        forced=_bool(fields.get(FORCED)),
    )


def _parse_last_maintenance(value: Any) -> MaintenanceRecord | None:
    fields = _map(value)
    if fields is None:
        return None
    return MaintenanceRecord(
        since=_number(fields.get(SINCE)) or 0.0,
        ended_at=_number(fields.get(ENDED_AT)) or 0.0,
        by=_string(fields.get(BY)) or "",
        reason=_string(fields.get(REASON)) or "",
        forced=_bool(fields.get(FORCED)),
        result=_string(fields.get(RESULT)) or "",
    )


def _parse_legacy_leases(value: Any, problems: list[str]) -> tuple[LegacyLease, ...]:
    if value is None:
        return ()
    entries = value.get("SS") if isinstance(value, Mapping) else None
    if not isinstance(entries, list):
        problems.append(f"{LEGACY_LEASES} is not a string set: judged like a legacy marker, by {LAST_OP_AT}")
        return ()
    parsed: list[LegacyLease] = []
    for raw in entries:
        text = str(raw)
        started_raw, _, rest = text.partition("|")
        kind, _, lease_id = rest.partition("|")
        started = parse_iso(started_raw)
        if started is None:
            problems.append(f"legacy lease {text[:64]!r} has no readable start time")
        parsed.append(LegacyLease(raw=text, started_at=started, kind=kind or "unknown", lease_id=lease_id))
    return tuple(sorted(parsed, key=lambda lease: lease.raw))


# --- wire-format helpers --------------------------------------------------------------------------
def _string(value: Any) -> str | None:
    if isinstance(value, Mapping) and isinstance(value.get("S"), str):
        return str(value["S"])
    return None


def _number(value: Any) -> float | None:
    if not isinstance(value, Mapping) or "N" not in value:
        return None
    try:
        number = float(value["N"])
    except (TypeError, ValueError, OverflowError):  # OverflowError: a Python int beyond float range
        return None
    return number if math.isfinite(number) else None


def _bool(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("BOOL") is True


def _map(value: Any) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping) and isinstance(value.get("M"), Mapping):
        return value["M"]  # type: ignore[no-any-return]
    return None


def parse_iso(text: str | None) -> float | None:
    """Epoch seconds of an ISO-8601 time; a time without a zone is UTC. None when unreadable."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def num(value: float) -> dict[str, str]:
    """A DynamoDB number; whole seconds print without a fraction."""
    return {"N": str(int(value)) if float(value).is_integer() else repr(float(value))}


def string(value: str) -> dict[str, str]:
    return {"S": value}


def key(value: str) -> dict[str, dict[str, str]]:
    """The wire-format key of the item whose partition key is ``value`` (see ``keys.InstanceKeys``)."""
    return {INSTANCE_ID: string(value)}


# --- update expressions: the writer -------------------------------------------------------------
# A new lease is refused while the guard drains the instance for a termination, while an operator
# drains it for maintenance, and while a release of this boot stands.
_DRAIN_CLAUSE = (
    "attribute_not_exists(#draining) AND attribute_not_exists(#maintenance)"
    " AND (attribute_not_exists(#released) OR #released.#at < :boot)"
)


def lease_value(lease: Lease) -> dict[str, Any]:
    return {
        "M": {
            KIND: string(lease.kind),
            HOLDER: string(lease.holder),
            STARTED_AT: num(lease.started_at),
            HEARTBEAT_AT: num(lease.heartbeat_at),
            EXPIRES_AT: num(lease.expires_at),
        }
    }


def begin_update(lease: Lease, *, boot_time: float, create_map: bool) -> UpdateRequest:
    """Add a lease, count it, and refuse while the guard is draining this instance.

    DynamoDB cannot ``SET leases.#id`` while ``leases`` is missing, so the first lease of an item
    creates the map (``create_map``), conditioned on the map still being missing; every later
    lease adds to it, conditioned on the map existing and not yet holding this lease id. The caller
    switches on which one failed; finding its own lease in the old item means an earlier attempt of
    the same request already succeeded.
    ``REMOVE released, expires_at``: the condition guarantees a ``released`` mark is from before
    this boot (a warm-pool instance), so TTL never deletes a live instance's item.
    """
    names = {
        "#leases": LEASES,
        "#count": COUNTER,
        "#last_at": LAST_OP_AT,
        "#last_kind": LAST_OP_KIND,
        "#draining": DRAINING,
        "#maintenance": MAINTENANCE,
        "#released": RELEASED,
        "#at": AT,
        "#ttl": TTL,
    }
    values: dict[str, Any] = {
        ":one": num(1),
        ":boot": num(boot_time),
        ":now_iso": string(iso(lease.heartbeat_at)),
        ":kind": string(lease.kind),
    }
    if create_map:
        target = "#leases = :leases"
        values[":leases"] = {"M": {lease.lease_id: lease_value(lease)}}
        map_clause = "attribute_not_exists(#leases)"
    else:
        names["#id"] = lease.lease_id
        target = "#leases.#id = :lease"
        values[":lease"] = lease_value(lease)
        # Not already there: a retried request whose first attempt landed (a lost response) must
        # not count the same lease twice. The caller sees its own lease in the returned old item.
        map_clause = "attribute_exists(#leases) AND attribute_not_exists(#leases.#id)"
    return {
        "UpdateExpression": (
            f"SET {target}, #last_at = :now_iso, #last_kind = :kind ADD #count :one REMOVE #released, #ttl"
        ),
        "ConditionExpression": f"{map_clause} AND {_DRAIN_CLAUSE}",
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
        # On success too: the writer prunes the leases of crashed processes it finds there.
        "ReturnValues": "ALL_OLD",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def end_update(lease_id: str, *, kind: str, now: float) -> UpdateRequest:
    """Remove a lease and uncount it, only if it is there: a lost begin never drives the counter
    below zero."""
    return {
        "UpdateExpression": (
            "REMOVE #leases.#id SET #last_at = :now_iso, #last_kind = :kind ADD #count :minus_one"
        ),
        "ConditionExpression": "attribute_exists(#leases.#id)",
        "ExpressionAttributeNames": {
            "#leases": LEASES,
            "#id": lease_id,
            "#count": COUNTER,
            "#last_at": LAST_OP_AT,
            "#last_kind": LAST_OP_KIND,
        },
        "ExpressionAttributeValues": {
            ":minus_one": num(-1),
            ":now_iso": string(iso(now)),
            ":kind": string(kind),
        },
    }


def counter_probe_update() -> UpdateRequest:
    """Read the item through ``UpdateItem`` (the writer's only permission) when the counter may not
    be a number: the condition fails on a counter of any other type and returns the item as it is.
    On a numeric counter it succeeds and sets the counter to itself, which changes nothing and so
    emits no stream record."""
    return {
        "UpdateExpression": "SET #count = #count",
        "ConditionExpression": "attribute_type(#count, :number)",
        "ExpressionAttributeNames": {"#count": COUNTER},
        "ExpressionAttributeValues": {":number": string("N")},
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def repaired_counter(state: BusyState, raw: str, own_lease_id: str) -> int:
    """The number a string-typed counter becomes: its value where it reads as a whole number (what
    its writer meant), and never below the number of other leases on the item. The repairing
    begin's own lease counts once more if it is already there: DynamoDB applies an update whole or
    not at all, but moto applies the ``SET`` of a begin whose ``ADD`` it then refuses."""
    try:
        meant = max(int(raw.strip()), 0)
    except ValueError:
        meant = 0
    others = sum(lease.lease_id != own_lease_id for lease in state.leases) + state.corrupt_leases
    return max(meant, others) + (len(state.leases) + state.corrupt_leases - others)


def repair_counter_update(seen: str, value: int) -> UpdateRequest:
    """Turn a string-typed counter back into a number, only if it is still the string the writer saw.

    DynamoDB refuses ``ADD`` on a string ("An operand in the update expression has an incorrect
    data type"), so while the counter is a string every begin and end fails and the work runs
    without a lease. Nothing our writers do changes the leases while it is a string (every begin,
    end and prune ``ADD``s to it), so the condition on its type and value is the whole proof."""
    return {
        "UpdateExpression": "SET #count = :value",
        "ConditionExpression": "attribute_type(#count, :string) AND #count = :seen",
        "ExpressionAttributeNames": {"#count": COUNTER},
        "ExpressionAttributeValues": {":string": string("S"), ":seen": string(seen), ":value": num(value)},
    }


def prune_lease_update(lease: Lease) -> UpdateRequest:
    """Remove a crashed process's lease, and uncount it, only if nobody renewed it meanwhile.

    Left in place, an orphan keeps the counter above zero for the instance's whole life, so the
    stream's "last lease ended" never fires and every release waits for the schedule."""
    return {
        "UpdateExpression": "REMOVE #leases.#id ADD #count :minus_one",
        "ConditionExpression": "#leases.#id.#exp = :exp",
        "ExpressionAttributeNames": {
            "#leases": LEASES,
            "#id": lease.lease_id,
            "#exp": EXPIRES_AT,
            "#count": COUNTER,
        },
        "ExpressionAttributeValues": {":exp": num(lease.expires_at), ":minus_one": num(-1)},
    }


def heartbeat_update(lease_id: str, *, now: float, expires_at: float) -> UpdateRequest:
    """Renew a lease that still exists; a lease removed by someone else is not resurrected."""
    return {
        "UpdateExpression": "SET #leases.#id.#hb = :now, #leases.#id.#exp = :exp, #last_at = :now_iso",
        "ConditionExpression": "attribute_exists(#leases.#id)",
        "ExpressionAttributeNames": {
            "#leases": LEASES,
            "#id": lease_id,
            "#hb": HEARTBEAT_AT,
            "#exp": EXPIRES_AT,
            "#last_at": LAST_OP_AT,
        },
        "ExpressionAttributeValues": {
            ":now": num(now),
            ":exp": num(expires_at),
            ":now_iso": string(iso(now)),
        },
    }


# --- update expressions: the guard --------------------------------------------------------------
def draining_value(draining: Draining) -> dict[str, Any]:
    return {"M": {SINCE: num(draining.since), ASG: string(draining.asg), HOOK: string(draining.hook)}}


def released_value(released: Released) -> dict[str, Any]:
    return {"M": {AT: num(released.at), REASON: string(released.reason), BY: string(released.by)}}


def mark_draining_update(draining: Draining) -> UpdateRequest:
    """The guard's look: mark the instance draining and return the whole item in one atomic call.

    ``if_not_exists`` keeps the first ``since``, so every later look writes nothing and emits no
    stream record. ``REMOVE expires_at`` keeps TTL away from an item the guard is waiting on.
    """
    return {
        "UpdateExpression": "SET #draining = if_not_exists(#draining, :draining) REMOVE #ttl",
        "ExpressionAttributeNames": {"#draining": DRAINING, "#ttl": TTL},
        "ExpressionAttributeValues": {":draining": draining_value(draining)},
        "ReturnValues": "ALL_NEW",
    }


# ``attribute_type`` first: a counter of another type (a string) is not a number <= 0, so the
# instance is not provably idle. DynamoDB evaluates such a comparison as false; moto raises TypeError
# from inside its evaluator instead, which the type check keeps it from reaching.
_IDLE_CLAUSE = (
    "(attribute_not_exists(#count) OR (attribute_type(#count, :number) AND #count <= :zero))"
    " AND (attribute_not_exists(#leases) OR size(#leases) = :zero)"
    " AND attribute_not_exists(#legacy)"
)
_IDLE_NAMES = {"#count": COUNTER, "#leases": LEASES, "#legacy": LEGACY_LEASES}
_IDLE_VALUES = {":zero": num(0), ":number": string("N")}


def whole_seconds(epoch: float) -> int:
    """A TTL value: DynamoDB's TTL wants whole epoch seconds."""
    return int(epoch)


@dataclass(frozen=True)
class Proof:
    """What a release's condition must prove about the item itself, never about a copy of it.

    ``idle``: no lease, no counter above zero and no legacy set, exactly the item ``decide`` calls
    idle. Otherwise ``unchanged`` is the state a ``stale`` decision was made on: the claim requires
    the same number of leases with the same expiries, the same counter, the same number of legacy
    entries and the same writer timestamp, so any writer's change since the read defeats it."""

    idle: bool = False
    unchanged: BusyState | None = None
    # The companion item's own proof (keyed by the bare id), checked in the same transaction;
    # None: the companion is proven idle wherever one is read (see ``guard.table``).
    legacy: Proof | None = None


def proof_clauses(proof: Proof) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """(conditions, names, values) of a proof, for any conditional update of the guard's."""
    if proof.idle:
        return [_IDLE_CLAUSE], dict(_IDLE_NAMES), dict(_IDLE_VALUES)
    state = proof.unchanged
    if state is None:
        return [], {}, {}
    names: dict[str, str] = {"#last_at": LAST_OP_AT, **_IDLE_NAMES}
    values: dict[str, Any] = {}
    conditions: list[str] = []
    if state.last_op_at_raw is None:
        conditions.append("attribute_not_exists(#last_at)")
    else:
        values[":last_at"] = string(state.last_op_at_raw)
        conditions.append("#last_at = :last_at")
    if state.counter is not None:
        values[":count"] = num(state.counter)
        conditions.append("#count = :count")
    elif not state.unreadable_markers:
        conditions.append("attribute_not_exists(#count)")
    if not state.leases and not state.corrupt_leases:
        conditions.append("attribute_not_exists(#leases)")
    elif state.leases or state.corrupt_leases != 1:
        # (one corrupt entry and no lease is also what a ``leases`` that is no map parses as)
        values[":lease_count"] = num(len(state.leases) + state.corrupt_leases)
        conditions.append("size(#leases) = :lease_count")
    if state.leases:
        names["#exp"] = EXPIRES_AT
    for n, lease in enumerate(state.leases):
        names[f"#l{n}"] = lease.lease_id
        values[f":exp{n}"] = num(lease.expires_at)
        conditions.append(f"#leases.#l{n}.#exp = :exp{n}")
    if state.legacy_leases:
        values[":legacy_count"] = num(len(state.legacy_leases))
        conditions.append("size(#legacy) = :legacy_count")
    elif not state.unreadable_markers:
        conditions.append("attribute_not_exists(#legacy)")
    # DynamoDB refuses a name or value the expression does not use.
    used = set(re.findall(r"[#:][A-Za-z0-9_]+", " ".join(conditions)))
    return (
        conditions,
        {k: v for k, v in names.items() if k in used},
        {k: v for k, v in values.items() if k in used},
    )


def condition_check(proof: Proof) -> UpdateRequest:
    """A proof as a ``TransactWriteItems`` ConditionCheck (without TableName and Key): the release of
    an ARN-keyed item proves its bare-id companion in the same atomic transaction. An item that does
    not exist satisfies the idle proof (every ``attribute_not_exists`` holds)."""
    conditions, names, values = proof_clauses(proof)
    if not conditions:
        raise ValueError("a condition check needs a proof: idle, or unchanged since a read")
    request: UpdateRequest = {
        "ConditionExpression": " AND ".join(conditions),
        "ExpressionAttributeNames": names,
    }
    if values:
        request["ExpressionAttributeValues"] = values
    return request


def provable(state: BusyState) -> bool:
    """Whether a stale release of ``state`` fits in one condition expression (4 KB)."""
    return len(state.leases) <= settings.MAX_PROVEN_LEASES


def release_if_idle_update(released: Released, *, ttl: float, not_before: float) -> UpdateRequest:
    """Record the release of an instance that is provably idle, atomically with the check.

    The fast path for a new termination: when no lease and no counter exist, this one write both
    proves idleness and, through ``released``, refuses new leases, so ``CompleteLifecycleAction``
    may follow at once. A ``released`` mark newer than ``not_before`` (the event's time) means this
    termination was already finished, so a duplicate or late event changes nothing. On failure the
    old item comes back, which is the state to decide on.
    """
    return {
        "UpdateExpression": "SET #released = :released, #ttl = :ttl REMOVE #draining",
        "ConditionExpression": (
            f"{_IDLE_CLAUSE} AND (attribute_exists(#draining) OR attribute_not_exists(#released)"
            " OR #released.#at < :not_before)"
        ),
        "ExpressionAttributeNames": {
            **_IDLE_NAMES,
            "#draining": DRAINING,
            "#released": RELEASED,
            "#at": AT,
            "#ttl": TTL,
        },
        "ExpressionAttributeValues": {
            **_IDLE_VALUES,
            ":released": released_value(released),
            ":ttl": num(whole_seconds(ttl)),
            ":not_before": num(not_before),
        },
        "ReturnValues": "ALL_OLD",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def release_update(
    released: Released,
    *,
    ttl: float,
    draining_since: float | None,
    proof: Proof | None = None,
) -> UpdateRequest:
    """Move the mark from ``draining`` to ``released`` (with its TTL).

    ``draining_since`` makes it a claim on one particular wait: of two concurrent triggers only one
    succeeds, and a release never lands on a newer termination. ``proof`` is what the decision
    claims about the item (see :class:`Proof`); ``None`` only for ``max_wait`` and ``gone``, which
    end the wait whatever writers do. ``draining_since=None`` and no proof is the operator's
    unconditional override.
    """
    names: dict[str, str] = {"#released": RELEASED, "#ttl": TTL, "#draining": DRAINING}
    values: dict[str, Any] = {":released": released_value(released), ":ttl": num(whole_seconds(ttl))}
    conditions: list[str] = []
    if draining_since is not None:
        names["#since"] = SINCE
        values[":since"] = num(draining_since)
        conditions.append("#draining.#since = :since")
    if proof is not None:
        more, more_names, more_values = proof_clauses(proof)
        conditions.extend(more)
        names.update(more_names)
        values.update(more_values)
    request: UpdateRequest = {
        "UpdateExpression": "SET #released = :released, #ttl = :ttl REMOVE #draining",
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }
    if conditions:
        request["ConditionExpression"] = " AND ".join(conditions)
    return request


def record_heartbeat_update(*, draining_since: float, at: float) -> UpdateRequest:
    """Note on the draining mark when the guard last heartbeat the hook, so later ticks heartbeat
    only when one is due. Only on that very wait, and never backwards.

    The write changes the item, so it emits a stream record; the filter still drops it, because
    the counter is the same in both images (the filter wants it to go from non-zero to zero)."""
    return {
        "UpdateExpression": "SET #draining.#hb = :at",
        "ConditionExpression": (
            "#draining.#since = :since AND (attribute_not_exists(#draining.#hb) OR #draining.#hb < :at)"
        ),
        "ExpressionAttributeNames": {"#draining": DRAINING, "#since": SINCE, "#hb": HEARTBEAT_AT},
        "ExpressionAttributeValues": {":since": num(draining_since), ":at": num(at)},
    }


def recheck_release_update(released_at: float, *, now: float, proof: Proof) -> UpdateRequest:
    """Before completing a recorded release again, prove on the item what that release claimed.

    A recorded release refuses new leases, so a live lease beside it means the mark was not the
    guard's to trust (a forged or restored item): the condition fails and the guard looks again.
    Never matched by the stream filter (no ``draining``)."""
    conditions, names, values = proof_clauses(proof)
    return {
        "UpdateExpression": "SET #released.#rechecked = :now",
        "ConditionExpression": " AND ".join(
            ["attribute_not_exists(#draining)", "#released.#at = :at", *conditions]
        ),
        "ExpressionAttributeNames": {
            "#released": RELEASED,
            "#rechecked": RECHECKED_AT,
            "#draining": DRAINING,
            "#at": AT,
            **names,
        },
        "ExpressionAttributeValues": {":now": num(now), ":at": num(released_at), **values},
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def confirm_release_update(released_at: float, *, now: float) -> UpdateRequest:
    """Note that the recorded release is finished: the hook no longer waits on us.

    Only for the release recorded at ``released_at`` (never a newer termination's mark), and a
    write the stream filter never matches (no ``draining``)."""
    return {
        "UpdateExpression": "SET #released.#confirmed = :now",
        "ConditionExpression": "attribute_not_exists(#draining) AND #released.#at = :at",
        "ExpressionAttributeNames": {
            "#released": RELEASED,
            "#confirmed": CONFIRMED_AT,
            "#draining": DRAINING,
            "#at": AT,
        },
        "ExpressionAttributeValues": {":now": num(now), ":at": num(released_at)},
    }


def clear_release_update(released_at: float) -> UpdateRequest:
    """Remove the release mark (and its TTL) of an instance that is back in service: a warm-pool
    instance that did not reboot, or a late event's mark on a live instance, must not keep
    refusing work. Only that very mark, and never while a termination is draining it."""
    return {
        "UpdateExpression": "REMOVE #released, #ttl",
        "ConditionExpression": "attribute_not_exists(#draining) AND #released.#at = :at",
        "ExpressionAttributeNames": {"#released": RELEASED, "#ttl": TTL, "#draining": DRAINING, "#at": AT},
        "ExpressionAttributeValues": {":at": num(released_at)},
    }


# --- update expressions: maintenance (`busy-guard drain`) ------------------------------------------
def maintenance_value(mark: Maintenance) -> dict[str, Any]:
    return {
        "M": {
            SINCE: num(mark.since),
            BY: string(mark.by),
            REASON: string(mark.reason),
            TOKEN: string(mark.token),
            FORCED: {"BOOL": mark.forced},
        }
    }


def begin_maintenance_update(mark: Maintenance) -> UpdateRequest:
    """Mark the instance in maintenance, only if no other drain holds it.

    One conditional write, so two operators (or two CI jobs) can never both believe they own the
    instance: the loser gets the winner's mark back (``ALL_OLD``) to name it. ``draining`` and
    ``released`` are left alone: they are the guard's, and a termination in progress stays guarded.
    From this write on, every writer's begin fails its ``attribute_not_exists(#maintenance)``.
    """
    return {
        "UpdateExpression": "SET #maintenance = :mark",
        "ConditionExpression": "attribute_not_exists(#maintenance)",
        "ExpressionAttributeNames": {"#maintenance": MAINTENANCE},
        "ExpressionAttributeValues": {":mark": maintenance_value(mark)},
        "ReturnValues": "ALL_NEW",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def end_maintenance_update(mark: Maintenance, *, ended_at: float, result: str) -> UpdateRequest:
    """Remove this drain's own mark and leave a record of it (who, why, forced, how it ended).

    Conditioned on the mark's token: a drain that outlived its mark (``undrain`` cleared it, and
    another drain took the instance since) must never clear the newer drain's mark. Never touches
    ``draining``: a termination that arrived meanwhile is still the guard's to release.
    """
    record = {
        SINCE: num(mark.since),
        ENDED_AT: num(ended_at),
        BY: string(mark.by),
        REASON: string(mark.reason),
        FORCED: {"BOOL": mark.forced},
        RESULT: string(result),
    }
    names = {"#maintenance": MAINTENANCE, "#last": LAST_MAINTENANCE}
    values: dict[str, Any] = {":record": {"M": record}}
    if mark.token:
        names["#token"] = TOKEN
        values[":token"] = string(mark.token)
        condition = "#maintenance.#token = :token"
    else:  # an unreadable mark without a token (``undrain`` of a corrupt item): any mark at all
        condition = "attribute_exists(#maintenance)"
    return {
        "UpdateExpression": "REMOVE #maintenance SET #last = :record",
        "ConditionExpression": condition,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


# --- the stream filter ---------------------------------------------------------------------------
def stream_filter_pattern() -> dict[str, Any]:
    """Lambda event-source filter: only "the last lease of a draining instance just ended".

    The guard's own writes never match: its look leaves the counter alone and its release removes
    ``draining``. Heartbeats keep the counter above zero. Needs NEW_AND_OLD_IMAGES.
    """
    # No top-level ``eventName`` clause: DynamoDB event source mappings filter only on the ``dynamodb``
    # key (https://docs.aws.amazon.com/lambda/latest/dg/with-ddb-filtering.html), and requiring an
    # ``OldImage`` already means MODIFY.
    return {
        "dynamodb": {
            "OldImage": {COUNTER: {"N": [{"anything-but": ["0"]}]}},
            "NewImage": {
                COUNTER: {"N": ["0"]},
                DRAINING: {"M": {SINCE: {"N": [{"exists": True}]}}},
            },
        },
    }
