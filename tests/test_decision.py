"""decide(): the decision table, example by example, then as hypothesis properties."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from busy_guard.decision import Action, DecisionConfig, Reason, StateUnavailable, decide
from busy_guard.schema import BusyState, Draining, Lease, LegacyLease, iso, parse_item

NOW = 1_800_000_000.0
CONFIG = DecisionConfig()


def lease(lease_id: str = "a", *, expires_in: float = 120.0, kind: str = "bulk_table_insert") -> Lease:
    return Lease(lease_id, kind, "host:1", NOW - 60, NOW - 10, NOW + expires_in)


def draining_state(*leases: Lease, since: float = NOW - 60, **fields: object) -> BusyState:
    return BusyState(
        instance_id="i-0123456789abcdef0",
        exists=True,
        leases=tuple(leases),
        counter=len(leases) if "counter" not in fields else fields.pop("counter"),  # type: ignore[arg-type]
        draining=Draining(since, "asg", "busy-guard"),
        **fields,  # type: ignore[arg-type]
    )


def test_no_item_is_idle() -> None:
    decision = decide(BusyState("i-0123456789abcdef0"), CONFIG, NOW)
    assert (decision.action, decision.reason) == (Action.CONTINUE, Reason.IDLE)


def test_live_lease_waits() -> None:
    decision = decide(draining_state(lease()), CONFIG, NOW)
    assert (decision.action, decision.reason, decision.live_leases) == (Action.WAIT, Reason.BUSY, 1)
    assert "bulk_table_insert" in decision.detail


def test_expired_lease_is_stale_after_the_skew_allowance() -> None:
    just_expired = draining_state(lease(expires_in=-10))
    assert decide(just_expired, CONFIG, NOW).reason is Reason.BUSY  # within 30 s of skew
    long_expired = draining_state(lease(expires_in=-31))
    decision = decide(long_expired, CONFIG, NOW)
    assert (decision.action, decision.reason, decision.stale_markers) == (Action.CONTINUE, Reason.STALE, 1)


def test_max_wait_wins_over_a_live_lease() -> None:
    state = draining_state(lease(expires_in=600), since=NOW - CONFIG.max_wait)
    decision = decide(state, CONFIG, NOW)
    assert (decision.action, decision.reason) == (Action.CONTINUE, Reason.MAX_WAIT_EXCEEDED)
    abandon = DecisionConfig(max_wait_result=Action.ABANDON)
    assert decide(state, abandon, NOW).action is Action.ABANDON


def test_unreadable_state_waits_until_max_wait() -> None:
    unavailable = StateUnavailable("i-0123456789abcdef0", NOW - 60, "AccessDenied")
    decision = decide(unavailable, CONFIG, NOW)
    assert (decision.action, decision.reason) == (Action.WAIT, Reason.STATE_UNAVAILABLE)
    assert "AccessDenied" in decision.detail
    late = StateUnavailable("i-0123456789abcdef0", NOW - CONFIG.max_wait - 1, "AccessDenied")
    assert decide(late, CONFIG, NOW).reason is Reason.MAX_WAIT_EXCEEDED
    unknown_start = StateUnavailable("i-0123456789abcdef0", None, "timeout")
    assert decide(unknown_start, CONFIG, NOW).action is Action.WAIT


@pytest.mark.parametrize(
    ("counter", "age", "expected"),
    [
        (0, 10.0, Reason.IDLE),
        (-3, 10.0, Reason.IDLE),  # a leaked decrement: idle, never busy
        (2, 10.0, Reason.BUSY),
        (2, 6 * 3600 + 1, Reason.STALE),  # older than the legacy stale window
    ],
)
def test_legacy_counter_follows_the_old_rules(counter: int, age: float, expected: Reason) -> None:
    state = BusyState("i-0123456789abcdef0", exists=True, counter=counter, last_op_at=NOW - age)
    assert decide(state, CONFIG, NOW).reason is expected


def test_legacy_counter_without_a_readable_time_cannot_be_proven_stale() -> None:
    state = BusyState(
        "i-0123456789abcdef0", exists=True, counter=1, last_op_at=None, last_op_at_raw="garbage"
    )
    assert decide(state, CONFIG, NOW).reason is Reason.BUSY


def test_legacy_active_leases_judged_by_newest_start() -> None:
    fresh = LegacyLease("x", NOW - 100, "materialization", "1")
    old = LegacyLease("y", NOW - 7 * 3600, "materialization", "2")
    assert (
        decide(BusyState("i-1", exists=True, legacy_leases=(fresh, old)), CONFIG, NOW).reason is Reason.BUSY
    )
    stale = decide(BusyState("i-1", exists=True, legacy_leases=(old,)), CONFIG, NOW)
    assert (stale.reason, stale.stale_markers) == (Reason.STALE, 1)


@pytest.mark.parametrize(
    ("attributes", "age", "expected"),
    [
        ({"active_destructive_ops": {"S": "3"}}, 60.0, Reason.BUSY),
        ({"active_destructive_ops": {"S": "3"}}, 7 * 3600.0, Reason.STALE),
        ({"active_leases": {"L": [{"S": "x"}]}}, 60.0, Reason.BUSY),
        ({"active_leases": {"S": "x"}}, 7 * 3600.0, Reason.STALE),
    ],
)
def test_an_unreadable_counter_or_legacy_set_is_work_of_unknown_age(
    attributes: dict[str, object], age: float, expected: Reason
) -> None:
    item = {"instance_id": {"S": "i-1"}, "last_destructive_op_at": {"S": iso(NOW - age)}, **attributes}
    assert decide(parse_item(item), CONFIG, NOW).reason is expected


def test_corrupt_lease_is_judged_like_a_legacy_marker() -> None:
    recent = BusyState("i-1", exists=True, counter=1, corrupt_leases=1, last_op_at=NOW - 5)
    assert decide(recent, CONFIG, NOW).reason is Reason.BUSY
    old = replace(recent, last_op_at=NOW - 7 * 3600)
    assert decide(old, CONFIG, NOW).reason is Reason.STALE


def test_unreadable_draining_mark_never_triggers_max_wait() -> None:
    state = replace(draining_state(lease()), draining=Draining(0.0, "", ""))
    assert decide(state, CONFIG, NOW).reason is Reason.BUSY


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="max_wait_result"):
        DecisionConfig(max_wait_result=Action.WAIT)
    with pytest.raises(ValueError, match="clock_skew"):
        DecisionConfig(clock_skew=-1)


# --- properties ------------------------------------------------------------------------------------
offsets = st.floats(min_value=-50_000, max_value=50_000, allow_nan=False)
leases_strategy = st.lists(
    st.builds(
        lambda i, exp: Lease(f"l{i}", "k", "h", NOW - 100, NOW - 50, NOW + exp),
        st.integers(0, 10_000),
        offsets,
    ),
    max_size=8,
    unique_by=lambda lease: lease.lease_id,
)
configs = st.builds(
    DecisionConfig,
    max_wait=st.floats(min_value=60, max_value=48 * 3600),
    max_wait_result=st.sampled_from([Action.CONTINUE, Action.ABANDON]),
    clock_skew=st.floats(min_value=0, max_value=600),
    legacy_stale_after=st.floats(min_value=60, max_value=24 * 3600),
)
waits = st.floats(min_value=0, max_value=60 * 3600, allow_nan=False)


@settings(max_examples=150)
@given(leases=leases_strategy, config=configs, waited=waits)
def test_a_live_lease_always_waits_before_max_wait(
    leases: list[Lease], config: DecisionConfig, waited: float
) -> None:
    since = NOW - waited
    waited = NOW - since
    state = draining_state(*leases, since=since)
    decision = decide(state, config, NOW)
    has_live = any(lease.is_live(NOW, config.clock_skew) for lease in leases)
    if waited < config.max_wait and has_live:
        assert decision.action is Action.WAIT
    if not has_live and waited < config.max_wait:
        assert decision.action is Action.CONTINUE


@settings(max_examples=150)
@given(leases=leases_strategy, config=configs, waited=waits, counter=st.integers(-5, 5))
def test_nothing_waits_past_max_wait(
    leases: list[Lease], config: DecisionConfig, waited: float, counter: int
) -> None:
    since = NOW - waited
    waited = NOW - since  # what decide() sees, float rounding included
    state = draining_state(*leases, since=since, counter=counter, last_op_at=NOW)
    decision = decide(state, config, NOW)
    if waited >= config.max_wait:
        assert decision.action is config.max_wait_result
        assert decision.reason is Reason.MAX_WAIT_EXCEEDED
    unavailable = decide(StateUnavailable("i-1", since, "x"), config, NOW)
    assert unavailable.completes == (waited >= config.max_wait)


@settings(max_examples=200)
@given(leases=leases_strategy, config=configs, data=st.data())
def test_decision_never_depends_on_lease_order(
    leases: list[Lease], config: DecisionConfig, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(leases))
    first = decide(draining_state(*leases), config, NOW)
    second = decide(draining_state(*shuffled), config, NOW)
    assert first == second


@given(counter=st.integers(max_value=0), age=st.floats(min_value=0, max_value=10**7), config=configs)
def test_legacy_negative_or_zero_counts_are_idle(counter: int, age: float, config: DecisionConfig) -> None:
    state = BusyState("i-1", exists=True, counter=counter, last_op_at=NOW - age)
    decision = decide(state, config, NOW)
    assert (decision.action, decision.reason) == (Action.CONTINUE, Reason.IDLE)
