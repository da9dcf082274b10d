"""parse_item on every item shape the table can hold, legacy ones included, plus properties."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from busy_guard import schema
from busy_guard.schema import BusyState, Draining, Lease, LegacyLease, Released, SchemaError, parse_item

INSTANCE = "i-0123456789abcdef0"
KEY = {"instance_id": {"S": INSTANCE}}
T = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def item(**attributes: Any) -> dict[str, Any]:
    return {**KEY, **attributes}


def lease_entry(expires: str = "1700000180", **fields: Any) -> dict[str, Any]:
    entry = {
        "kind": {"S": "bulk_table_insert"},
        "holder": {"S": "host:42"},
        "started_at": {"N": "1700000000"},
        "heartbeat_at": {"N": "1700000060"},
        "expires_at": {"N": expires},
    }
    entry.update(fields)
    return {"M": {name: value for name, value in entry.items() if value is not None}}


# --- missing and minimal items ----------------------------------------------------------------------
@pytest.mark.parametrize("raw", [None, {}])
def test_no_item_is_an_idle_instance(raw: Any) -> None:
    assert parse_item(raw, INSTANCE) == BusyState(instance_id=INSTANCE)


def test_key_only_item() -> None:
    assert parse_item(KEY) == BusyState(instance_id=INSTANCE, exists=True, key=INSTANCE)


def test_the_key_on_the_item_wins_over_the_argument() -> None:
    assert parse_item(KEY, "i-other").instance_id == INSTANCE


@pytest.mark.parametrize("raw", [{"leases": {"M": {}}}, {"instance_id": {"N": "1"}}])
def test_an_item_without_a_string_key_and_no_fallback_is_a_schema_error(raw: Any) -> None:
    with pytest.raises(SchemaError):
        parse_item(raw)
    assert parse_item(raw, INSTANCE).instance_id == INSTANCE


@pytest.mark.parametrize("raw", [["instance_id"], "instance_id", 42])
def test_a_non_map_item_is_a_schema_error(raw: Any) -> None:
    with pytest.raises(SchemaError):
        parse_item(raw, INSTANCE)


# --- the current layout ---------------------------------------------------------------------------
def test_a_full_current_item() -> None:
    raw = item(
        leases={"M": {"b": lease_entry(), "a": lease_entry(expires="1700000300", kind={"S": "sec_staging"})}},
        active_destructive_ops={"N": "2"},
        last_destructive_op_at={"S": "2023-11-14T22:14:20Z"},
        last_destructive_op_kind={"S": "sec_staging"},
        draining={"M": {"since": {"N": "1700000100"}, "asg": {"S": "web"}, "hook": {"S": "busy-guard"}}},
        released={"M": {"at": {"N": "1600000000"}, "reason": {"S": "idle"}, "by": {"S": "guard"}}},
        expires_at={"N": "1700086400"},
    )
    assert parse_item(raw) == BusyState(
        instance_id=INSTANCE,
        key=INSTANCE,
        exists=True,
        leases=(
            Lease("a", "sec_staging", "host:42", T, T + 60, T + 300),
            Lease("b", "bulk_table_insert", "host:42", T, T + 60, T + 180),
        ),
        counter=2,
        last_op_at=T + 60,
        last_op_at_raw="2023-11-14T22:14:20Z",
        last_op_kind="sec_staging",
        draining=Draining(T + 100, "web", "busy-guard"),
        released=Released(1_600_000_000.0, "idle", "guard"),
        expires_at=T + 86400,
    )


def test_an_empty_lease_map_with_a_zero_counter() -> None:
    state = parse_item(item(leases={"M": {}}, active_destructive_ops={"N": "0"}))
    assert (state.leases, state.counter, state.untracked_ops, state.problems) == ((), 0, 0, ())


def test_lease_fields_fall_back_to_what_is_known() -> None:
    raw = item(leases={"M": {"x": lease_entry(kind=None, holder=None, started_at=None, heartbeat_at=None)}})
    assert parse_item(raw).leases == (Lease("x", "unknown", "unknown", T + 180, T + 180, T + 180),)
    raw = item(leases={"M": {"x": lease_entry(heartbeat_at=None)}})
    assert parse_item(raw).leases[0].heartbeat_at == T


def test_fractional_times_are_kept() -> None:
    raw = item(leases={"M": {"x": lease_entry(expires="1700000180.25")}})
    assert parse_item(raw).leases[0].expires_at == T + 180.25


# --- corrupted lease maps -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "entry",
    [
        {"S": "not a map"},
        {"M": {}},
        lease_entry(expires=None),
        {"M": {"expires_at": {"S": "1700000180"}}},
        {"M": {"expires_at": {"N": "soon"}}},
        {"M": {"expires_at": {"N": "NaN"}}},
        {"M": {"expires_at": {"N": "Infinity"}}},
        {"M": {"expires_at": {"N": 10**400}}},
        {"M": "not a mapping"},
        None,
    ],
)
def test_an_unreadable_lease_is_counted_corrupt_and_named(entry: Any) -> None:
    state = parse_item(
        item(leases={"M": {"good": lease_entry(), "bad": entry}}, active_destructive_ops={"N": "2"})
    )
    assert [lease.lease_id for lease in state.leases] == ["good"]
    assert state.corrupt_leases == 1
    assert state.untracked_ops == 1  # judged by the legacy rule, never silently dropped
    assert any("'bad'" in problem for problem in state.problems)


@pytest.mark.parametrize("leases", [{"S": "garbage"}, {"L": []}, {"M": "garbage"}, {"SS": ["a"]}, "raw"])
def test_a_lease_attribute_that_is_not_a_map(leases: Any) -> None:
    state = parse_item(item(leases=leases))
    assert (state.leases, state.corrupt_leases) == ((), 1)
    assert state.problems == ("leases is not a map: every lease in it is unreadable",)


# --- legacy: counter plus ISO timestamp -----------------------------------------------------------
@pytest.mark.parametrize(
    ("stamp", "epoch"),
    [
        ("2023-11-14T22:13:20+00:00", T),
        ("2023-11-14T22:13:20Z", T),
        ("2023-11-14T22:13:20", T),  # no zone: UTC
        ("2023-11-14T22:13:20.500000+00:00", T + 0.5),
        ("2023-11-15T00:13:20+02:00", T),
        (" 2023-11-14T22:13:20Z ", T),
        ("2023-11-14", T - 22 * 3600 - 13 * 60 - 20),
    ],
)
def test_legacy_counter_with_an_iso_timestamp(stamp: str, epoch: float) -> None:
    raw = item(
        active_destructive_ops={"N": "3"},
        last_destructive_op_at={"S": stamp},
        last_destructive_op_kind={"S": "materialization"},
    )
    state = parse_item(raw)
    assert (state.counter, state.last_op_at, state.last_op_at_raw, state.last_op_kind) == (
        3,
        epoch,
        stamp,
        "materialization",
    )
    assert (state.leases, state.untracked_ops, state.problems) == ((), 3, ())


@pytest.mark.parametrize("count", ["-1", "-7", "-0"])
def test_legacy_negative_or_zero_counter_is_idle_and_reported(count: str) -> None:
    state = parse_item(
        item(active_destructive_ops={"N": count}, last_destructive_op_at={"S": "2023-11-14T22:13:20Z"})
    )
    assert state.counter == int(count)
    assert state.untracked_ops == 0
    assert any("negative" in problem for problem in state.problems) == (int(count) < 0)


@pytest.mark.parametrize(
    "stamp", ["yesterday", "", "2023-13-45T99:00:00", "1700000000", "2023-11-14T22:13:20+25:00"]
)
def test_legacy_unparseable_timestamp(stamp: str) -> None:
    state = parse_item(item(active_destructive_ops={"N": "1"}, last_destructive_op_at={"S": stamp}))
    assert state.counter == 1
    assert state.last_op_at is None
    assert state.last_op_at_raw == stamp
    assert state.untracked_ops == 1
    if stamp:
        assert any("not an ISO-8601 time" in problem for problem in state.problems)


@pytest.mark.parametrize(
    ("counter", "expected"),
    [({"N": "2.9"}, 2), ({"N": "1e1"}, 10), ({"S": "2"}, None), ({"N": "two"}, None), ({"BOOL": True}, None)],
)
def test_legacy_counter_values(counter: Any, expected: int | None) -> None:
    state = parse_item(item(active_destructive_ops=counter))
    assert state.counter == expected
    assert (expected is None) == any("not a number" in problem for problem in state.problems)


def test_legacy_timestamp_of_the_wrong_type_is_ignored() -> None:
    state = parse_item(item(active_destructive_ops={"N": "1"}, last_destructive_op_at={"N": "1700000000"}))
    assert (state.last_op_at, state.last_op_at_raw) == (None, None)


def test_counter_below_the_lease_count_is_reported() -> None:
    state = parse_item(
        item(leases={"M": {"a": lease_entry(), "b": lease_entry()}}, active_destructive_ops={"N": "1"})
    )
    assert len(state.leases) == 2 and state.untracked_ops == 0
    assert any("below the number of leases" in problem for problem in state.problems)


def test_counter_above_the_lease_count_is_untracked_work() -> None:
    """A legacy writer bumped the counter next to a new-style lease."""
    state = parse_item(item(leases={"M": {"a": lease_entry()}}, active_destructive_ops={"N": "3"}))
    assert state.untracked_ops == 2


# --- legacy: the active_leases string set ---------------------------------------------------------
def test_legacy_active_leases_string_set() -> None:
    raw = item(
        active_leases={
            "SS": [
                "2023-11-14T22:13:20+00:00|bulk_table_insert|abc",
                "2023-11-14T22:13:20Z|dagster_materialization|def|with|pipes",
                "garbage",
                "not-a-time|sec_staging|ghi",
            ]
        }
    )
    state = parse_item(raw)
    assert state.legacy_leases == (
        LegacyLease("2023-11-14T22:13:20+00:00|bulk_table_insert|abc", T, "bulk_table_insert", "abc"),
        LegacyLease(
            "2023-11-14T22:13:20Z|dagster_materialization|def|with|pipes",
            T,
            "dagster_materialization",
            "def|with|pipes",
        ),
        LegacyLease("garbage", None, "unknown", ""),
        LegacyLease("not-a-time|sec_staging|ghi", None, "sec_staging", "ghi"),
    )
    assert sum("no readable start time" in problem for problem in state.problems) == 2


@pytest.mark.parametrize("value", [{"S": "a|b|c"}, {"L": [{"S": "a"}]}, {"SS": "a|b|c"}, ["a|b|c"]])
def test_legacy_active_leases_of_the_wrong_type(value: Any) -> None:
    state = parse_item(item(active_leases=value))
    assert state.legacy_leases == ()
    assert state.problems == (
        "active_leases is not a string set: judged like a legacy marker, by last_destructive_op_at",
    )
    assert state.untracked_ops == 1  # work of unknown age, not "no work"


# --- draining and released ------------------------------------------------------------------------
def test_draining_present() -> None:
    state = parse_item(
        item(draining={"M": {"since": {"N": "1700000000"}, "asg": {"S": "web"}, "hook": {"S": "h"}}})
    )
    assert state.draining == Draining(T, "web", "h")
    assert state.is_draining and not state.is_released


@pytest.mark.parametrize(
    "value", [{"S": "yes"}, {"M": {}}, {"M": {"since": {"S": "1700000000"}}}, {"BOOL": True}, {"NULL": True}]
)
def test_unreadable_draining_still_counts_as_draining(value: Any) -> None:
    state = parse_item(item(draining=value))
    assert state.draining == Draining(0.0, "", "")
    assert state.is_draining
    assert any("draining is unreadable" in problem for problem in state.problems)


def test_draining_without_its_optional_fields() -> None:
    assert parse_item(item(draining={"M": {"since": {"N": "5"}}})).draining == Draining(5.0, "", "")


def test_released_present() -> None:
    raw = item(released={"M": {"at": {"N": "1700000000"}, "reason": {"S": "gone"}, "by": {"S": "guard"}}})
    state = parse_item(raw)
    assert state.released == Released(T, "gone", "guard")
    assert state.is_released and not state.is_draining


def test_released_and_draining_again_is_not_released() -> None:
    """A warm-pool instance's second termination: the new wait is what counts."""
    raw = item(
        released={"M": {"at": {"N": "1600000000"}, "reason": {"S": "idle"}, "by": {"S": "guard"}}},
        draining={"M": {"since": {"N": "1700000000"}}},
    )
    state = parse_item(raw)
    assert state.is_draining and not state.is_released


@pytest.mark.parametrize("value", [{"S": "yes"}, {"M": {}}, {"M": {"at": {"N": "x"}}}])
def test_unreadable_released(value: Any) -> None:
    state = parse_item(item(released=value))
    assert state.released == Released(0.0, "unknown", "unknown")
    assert any("released is unreadable" in problem for problem in state.problems)


def test_ttl() -> None:
    assert parse_item(item(expires_at={"N": "1700086400"})).expires_at == T + 86400
    assert parse_item(item(expires_at={"S": "tomorrow"})).expires_at is None


def test_unknown_attributes_are_ignored() -> None:
    state = parse_item(item(something_new={"S": "x"}, active_destructive_ops={"N": "0"}))
    assert state.problems == () and state.counter == 0


# --- the builders' values read back ---------------------------------------------------------------
def test_lease_value_round_trip() -> None:
    lease = Lease("id1", "sec_staging", "host:1", T, T + 60.5, T + 240.5)
    assert parse_item(item(leases={"M": {"id1": schema.lease_value(lease)}})).leases == (lease,)


def test_draining_and_released_values_round_trip() -> None:
    draining, released = Draining(T, "web", "hook"), Released(T + 5, "idle", "guard")
    state = parse_item(
        item(draining=schema.draining_value(draining), released=schema.released_value(released))
    )
    assert (state.draining, state.released) == (draining, released)


def test_num_and_iso() -> None:
    assert schema.num(1700000000.0) == {"N": "1700000000"}
    assert schema.num(1.5) == {"N": "1.5"}
    assert schema.iso(T) == "2023-11-14T22:13:20Z"
    assert schema.parse_iso(schema.iso(T)) == T


# --- properties -----------------------------------------------------------------------------------
_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
_number_text = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "NaN", "-Infinity", "1e400", "0x10", " 7 ", "1_000"]),
    _text,
)
_scalar = st.one_of(
    st.builds(lambda text: {"S": text}, _text),
    st.builds(lambda text: {"N": text}, _number_text),
    st.builds(lambda flag: {"BOOL": flag}, st.booleans()),
    st.just({"NULL": True}),
    st.builds(lambda texts: {"SS": texts}, st.lists(_text, max_size=4)),
    st.builds(lambda texts: {"NS": texts}, st.lists(_number_text, max_size=3)),
    # not wire format at all
    st.none(),
    st.integers(),
    _text,
    st.builds(
        lambda value: {"N": value}, st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.integers()))
    ),
)
_field_names = st.one_of(
    st.sampled_from(
        [
            schema.KIND,
            schema.HOLDER,
            schema.STARTED_AT,
            schema.HEARTBEAT_AT,
            schema.EXPIRES_AT,
            schema.SINCE,
            schema.ASG,
            schema.HOOK,
            schema.AT,
            schema.REASON,
            schema.BY,
        ]
    ),
    _text,
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.builds(lambda fields: {"M": fields}, st.dictionaries(_field_names, inner, max_size=5)),
        st.builds(lambda values: {"L": values}, st.lists(inner, max_size=3)),
        st.builds(lambda fields: {"M": fields}, st.dictionaries(_text, inner, max_size=3)),
    ),
    max_leaves=6,
)
_attribute_names = st.sampled_from(
    [
        schema.LEASES,
        schema.COUNTER,
        schema.LAST_OP_AT,
        schema.LAST_OP_KIND,
        schema.DRAINING,
        schema.RELEASED,
        schema.TTL,
        schema.LEGACY_LEASES,
        schema.INSTANCE_ID,
        "other",
    ]
)
_items = st.dictionaries(_attribute_names, _value, max_size=6)


@given(_items)
def test_parse_never_raises_on_wire_format_ish_items(raw: dict[str, Any]) -> None:
    state = parse_item(raw, INSTANCE)
    assert state.exists == bool(raw)
    assert state.untracked_ops >= 0
    for lease in state.leases:
        assert isinstance(lease.expires_at, float)


@given(_items.map(lambda raw: {**raw, schema.INSTANCE_ID: {"S": "i-x"}}))
def test_parse_never_raises_with_the_key_present(raw: dict[str, Any]) -> None:
    assert parse_item(raw).instance_id == "i-x"


_finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
_leases = st.builds(
    Lease,
    lease_id=st.text(min_size=1, max_size=32),
    kind=st.text(min_size=1, max_size=24),
    holder=st.text(min_size=1, max_size=24),
    started_at=_finite,
    heartbeat_at=_finite,
    expires_at=_finite,
)


@given(st.lists(_leases, max_size=8, unique_by=lambda lease: lease.lease_id), st.randoms())
def test_lease_order_does_not_matter(leases: list[Lease], rng: random.Random) -> None:
    entries = [(lease.lease_id, schema.lease_value(lease)) for lease in leases]
    shuffled = entries[:]
    rng.shuffle(shuffled)
    first = parse_item(item(leases={"M": dict(entries)}))
    second = parse_item(item(leases={"M": dict(shuffled)}))
    assert first == second
    assert sorted(first.leases, key=lambda lease: lease.lease_id) == list(first.leases)


@given(_leases)
def test_lease_value_round_trips_through_parse(lease: Lease) -> None:
    state = parse_item(item(leases={"M": {lease.lease_id: schema.lease_value(lease)}}))
    assert state.leases == (lease,)
    assert state.problems == ()


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_iso_round_trips_within_a_second(epoch: float) -> None:
    parsed = schema.parse_iso(schema.iso(epoch))
    assert parsed is not None and parsed.is_integer() and abs(parsed - epoch) < 1


@given(_text)
def test_parse_iso_never_raises(text: str) -> None:
    schema.parse_iso(text)


# --- DynamoDB Local's untyped empty map -----------------------------------------------------------
def test_an_empty_lease_map_in_either_shape() -> None:
    """AWS always types a value (``{"M": {}}``); DynamoDB Local's stream records write the empty map
    as ``{}``. The parser reads only the typed shape as "no leases": an untyped value stays an
    unreadable lease, which holds the instance (a malformed value must never read as idle). The
    sandbox's record adapter (``typed_empty_maps``) is where DynamoDB Local's shape is absorbed."""
    from busy_guard.sandbox.world import typed_empty_maps

    typed = parse_item(item(leases={"M": {}}, active_destructive_ops={"N": "0"}))
    assert (typed.leases, typed.corrupt_leases, typed.problems) == ((), 0, ())
    untyped = parse_item(item(leases={}, active_destructive_ops={"N": "0"}))
    assert untyped.corrupt_leases == 1 and untyped.untracked_ops == 1
    adapted = {name: typed_empty_maps(value) for name, value in item(leases={}).items()}
    assert parse_item(adapted) == parse_item(item(leases={"M": {}}))
    nested = {"M": {"a": {}, "b": {"L": [{}, {"S": "x"}]}, "c": {"N": "1"}}}
    assert typed_empty_maps(nested) == {
        "M": {"a": {"M": {}}, "b": {"L": [{"M": {}}, {"S": "x"}]}, "c": {"N": "1"}}
    }


# --- every request form on every item state, on both engines ---------------------------------------
LIVE = Lease("live", "bulk_table_insert", "h:1", T, T, T + 180)
NEW = Lease("new", "materialization", "h:2", T + 5, T + 5, T + 185)
ITEM_STATES: dict[str, dict[str, Any] | None] = {
    "absent": None,
    "key-only": item(),
    "idle": item(leases={"M": {}}, active_destructive_ops={"N": "0"}),
    "busy": item(
        leases={"M": {"live": schema.lease_value(LIVE)}},
        active_destructive_ops={"N": "1"},
        last_destructive_op_at={"S": schema.iso(T)},
    ),
    "draining-busy": item(
        leases={"M": {"live": schema.lease_value(LIVE)}},
        active_destructive_ops={"N": "1"},
        last_destructive_op_at={"S": schema.iso(T)},
        draining=schema.draining_value(Draining(T, "graph-db", "busy-guard")),
    ),
    "draining-only": item(draining=schema.draining_value(Draining(T, "graph-db", "busy-guard"))),
    "released": item(
        released=schema.released_value(Released(T, "idle", "guard")), expires_at={"N": "1800000000"}
    ),
    "legacy-counter": item(
        active_destructive_ops={"N": "2"}, last_destructive_op_at={"S": "2024-05-01T10:00:00+00:00"}
    ),
    "legacy-set": item(active_leases={"SS": ["2024-05-01T10:00:00+00:00|backfill|abc"]}),
}
REQUESTS: dict[str, schema.UpdateRequest] = {
    "begin-add": schema.begin_update(NEW, boot_time=T - 100, create_map=False),
    "begin-create": schema.begin_update(NEW, boot_time=T - 100, create_map=True),
    "end": schema.end_update("live", kind="k", now=T + 10),
    "heartbeat": schema.heartbeat_update("live", now=T + 60, expires_at=T + 240),
    "prune": schema.prune_lease_update(LIVE),
    "mark-draining": schema.mark_draining_update(Draining(T + 1, "graph-db", "busy-guard")),
    "release-if-idle": schema.release_if_idle_update(
        Released(T + 2, "idle", "guard"), ttl=T + 86400, not_before=T
    ),
    "release-claim": schema.release_update(
        Released(T + 2, "stale", "guard"), ttl=T + 86400, draining_since=T
    ),
    "release-unchanged": schema.release_update(
        Released(T + 2, "stale", "guard"),
        ttl=T + 86400,
        draining_since=T,
        proof=schema.Proof(unchanged=parse_item(ITEM_STATES["draining-busy"])),
    ),
    "release-override": schema.release_update(
        Released(T + 2, "operator", "me"), ttl=T + 86400, draining_since=None
    ),
    "confirm-release": schema.confirm_release_update(T, now=T + 3),
    "clear-release": schema.clear_release_update(T),
    "counter-probe": schema.counter_probe_update(),
}


def apply(client: Any, table: str, state: str, request: str) -> tuple[str, Any]:
    """Write the item state, send the request; what happened and the item afterwards."""
    instance = f"i-{state}-{request}"
    start = ITEM_STATES[state]
    if start is not None:
        client.put_item(TableName=table, Item={**start, "instance_id": {"S": instance}})
    try:
        client.update_item(TableName=table, Key=schema.key(instance), **REQUESTS[request])
        outcome = "applied"
    except client.exceptions.ClientError as error:
        outcome = error.response["Error"]["Code"]
    after = client.get_item(TableName=table, Key=schema.key(instance), ConsistentRead=True).get("Item")
    return outcome, after


def test_every_request_form_on_every_item_state_is_valid_and_moto_agrees_with_dynamodb_local(
    aws: None, dynamodb_local: Any
) -> None:
    """The project's whole protocol is these requests: run each on each well-formed item state on
    both engines. Amazon's engine rejects none of them as invalid, and moto reaches the same outcome
    (applied, or the condition failed) and the same item every time."""
    from conftest import aws_session, create_busy_table

    moto_client = aws_session().client("dynamodb")
    local_client = aws_session().client("dynamodb", endpoint_url=dynamodb_local.endpoint_url)
    table = f"busy_guard.forms-{uuid.uuid4().hex[:12]}"
    for client in (moto_client, local_client):
        create_busy_table(client, table)
    disagreements = []
    outcomes: dict[str, int] = {}
    try:
        for state in ITEM_STATES:
            for request in REQUESTS:
                local = apply(local_client, table, state, request)
                assert local[0] in ("applied", "ConditionalCheckFailedException"), (state, request, local)
                outcomes[local[0]] = outcomes.get(local[0], 0) + 1
                if apply(moto_client, table, state, request) != local:
                    disagreements.append((state, request))
    finally:
        local_client.delete_table(TableName=table)
    assert disagreements == []
    assert outcomes["applied"] > 30 and outcomes["ConditionalCheckFailedException"] > 30, outcomes
