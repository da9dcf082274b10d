"""The planner's properties, checked with hypothesis on pure data: no moto, no clock, no I/O.

One instance's protocol is driven with arbitrary answers (any item a write may return, any answer
Auto Scaling may give, the table failing at any step), and a tick is planned from arbitrary listings
and tables. Whatever happens:

- a completion follows only a write that proved the decision on the item (or max_wait);
- a release's proof is what its decision claims: the idle clause for idle, the unchanged state for
  stale, none only for max_wait;
- a heartbeat is only sent when one is due;
- every chain ends, within a bounded number of steps;
- a tick acts only on valid instance ids of our groups, at most ``max_work`` of them;
- a maintenance mark (``busy-guard drain``) changes nothing the planner does: not one step, not one
  decision, not one tick's plan. Writers honour it; the guard neither reads it as a termination nor
  lets it hold a termination that has no live lease.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from busy_guard import decision as decision_module
from busy_guard import schema, settings
from busy_guard.decision import Action, DecisionConfig, Reason, decide
from busy_guard.guard import planner
from busy_guard.guard.autoscaling import GroupInstance, HookResult
from busy_guard.schema import BusyState, Draining, Lease, Maintenance, Proof, Released

NOW = 1_800_000_000.0
CONFIG = DecisionConfig(max_wait=3600.0, clock_skew=30.0, legacy_stale_after=6 * 3600.0)
HOOK = "busy-guard"
GROUPS = ("graph-db", "other")
MAX_STEPS = 12


def policy(heartbeat_every: float = 300.0) -> planner.Policy:
    return planner.Policy(
        decision=CONFIG,
        hook_name=HOOK,
        heartbeat_every=heartbeat_every,
        released_ttl=86_400.0,
        actor="test",
        now=NOW,
    )


instance_ids = st.sampled_from([f"i-{n:017x}" for n in range(6)])
times = st.floats(min_value=NOW - 2 * CONFIG.max_wait, max_value=NOW + 60, allow_nan=False)
leases = st.builds(
    Lease,
    lease_id=st.text("abcdef", min_size=1, max_size=4),
    kind=st.just("bulk"),
    holder=st.just("w"),
    started_at=st.just(NOW - 600),
    heartbeat_at=st.just(NOW - 60),
    expires_at=st.floats(min_value=NOW - 600, max_value=NOW + 600, allow_nan=False),
)
drainings = st.builds(
    Draining,
    since=times,
    asg=st.sampled_from(GROUPS),
    hook=st.sampled_from([HOOK, "", "someone-else"]),
    heartbeat_at=st.none() | times,
)
releaseds = st.builds(
    Released,
    at=times,
    reason=st.sampled_from(["idle", "stale", "max_wait_exceeded", "gone", "operator: x"]),
    by=st.just("guard"),
    confirmed_at=st.none() | times,
)


@st.composite
def items(draw: st.DrawFn, instance_id: str | None = None) -> BusyState:
    found = draw(st.lists(leases, max_size=3, unique_by=lambda lease: lease.lease_id))
    counter = draw(st.none() | st.integers(min_value=-1, max_value=4))
    return BusyState(
        instance_id=instance_id or draw(instance_ids),
        exists=True,
        leases=tuple(sorted(found, key=lambda lease: lease.lease_id)),
        counter=counter,
        last_op_at=NOW - 60,
        last_op_at_raw="2027-01-15T08:00:00Z",
        draining=draw(st.none() | drainings),
        released=draw(st.none() | releaseds),
    )


@st.composite
def states(draw: st.DrawFn, instance_id: str | None = None) -> BusyState:
    """An item, and sometimes its bare-id companion (the isolated scheme reading legacy items)."""
    state = draw(items(instance_id))
    if draw(st.booleans()):
        return state
    return replace(
        state,
        key=f"arn:aws:ec2:us-east-1:123456789012:instance/{state.instance_id}",
        legacy=draw(items(state.instance_id)),
    )


@st.composite
def requests(draw: st.DrawFn) -> planner.Request:
    instance_id = draw(instance_ids)
    started = draw(st.none() | times)
    return planner.Request(
        instance_id=instance_id,
        asg="graph-db",
        wait_started=started,
        not_before=started or 0.0,
        seen=draw(st.none() | states(instance_id)),
        probe=draw(st.booleans()),
        recorded=draw(st.none() | releaseds),
    )


def answer_for(step: planner.Step, draw: st.DrawFn, instance_id: str) -> planner.Answer:
    """Any answer the adapters could give to ``step``, the table failing included."""
    if draw(st.integers(0, 9)) == 0 and not isinstance(step, (planner.Heartbeat, planner.Complete)):
        return planner.Unavailable("DynamoDB UpdateItem failed: ThrottlingException")
    match step:
        case planner.Heartbeat() | planner.Complete():
            return draw(st.sampled_from(list(HookResult)))
        case planner.MarkDraining(draining=draining):
            state = draw(states(instance_id))
            return replace(state, draining=state.draining or draining)
        case planner.RecordHeartbeat() | planner.Confirm():
            return draw(st.booleans())
        case _:
            return planner.Written(draw(st.booleans()), draw(states(instance_id)))


@given(request=requests(), data=st.data())
def test_every_chain_ends_and_completes_only_on_proof(request: planner.Request, data: st.DataObject) -> None:
    rules = policy()
    progress = planner.first_step(request, rules)
    previous: tuple[planner.Step, planner.Answer] | None = None
    for _ in range(MAX_STEPS):
        step = progress.step
        if isinstance(step, planner.Done):
            return
        if isinstance(step, planner.Complete):
            proved = previous is not None and isinstance(previous[1], planner.Written) and previous[1].ok
            proved = proved and isinstance(
                previous[0], (planner.ReleaseIfIdle, planner.Claim, planner.Recheck)
            )
            decision = progress.decision
            assert decision is not None
            # max_wait (decided, recorded, or with the table unreadable) ends the wait unproven.
            assert proved or decision.reason is Reason.MAX_WAIT_EXCEEDED, (previous, decision)
        if isinstance(step, planner.Claim):
            assert_proof_matches_decision(step, progress)
        answer = answer_for(step, data.draw, request.instance_id)
        previous = (step, answer)
        progress = planner.next_step(progress, answer, rules)
    raise AssertionError(f"no end after {MAX_STEPS} steps: {progress}")


def assert_proof_matches_decision(step: planner.Claim, progress: planner.Progress) -> None:
    decision, state = progress.decision, progress.state
    assert decision is not None and state is not None
    assert decision.completes
    if decision.reason is Reason.MAX_WAIT_EXCEEDED:
        assert step.proof is None
        return
    # Each item proves its own decision: the instance's, and its companion's in the same transaction.
    own = replace(state, legacy=None)
    assert_item_proof(step.proof, own)
    if state.legacy is not None:
        assert step.proof is not None
        assert_item_proof(step.proof.legacy, decision_module.companion_of(state))
    else:
        assert step.proof is not None and step.proof.legacy is None
    assert step.draining_since == (
        state.draining.since if state.draining and state.draining.since > 0 else None
    )


def assert_item_proof(proof: Proof | None, item: BusyState) -> None:
    reason = decide(item, CONFIG, NOW).reason
    assert proof is not None, reason
    if reason is Reason.IDLE:
        assert proof.idle and proof.unchanged is None
    else:
        assert reason is Reason.STALE and not proof.idle and proof.unchanged == item


@st.composite
def quiet_items(draw: st.DrawFn, instance_id: str) -> BusyState:
    """Items whose work is as often over (idle, expired, a counter past the stale window) as not."""
    found = draw(st.lists(leases, max_size=2, unique_by=lambda lease: lease.lease_id))
    counter = draw(st.sampled_from([None, 0, len(found), len(found) + 1]))
    last_at = draw(st.sampled_from([NOW - 60, NOW - 7 * 3600]))
    return BusyState(
        instance_id=instance_id,
        exists=True,
        leases=tuple(sorted(found, key=lambda lease: lease.lease_id)),
        counter=counter,
        last_op_at=last_at,
        last_op_at_raw=schema.iso(last_at),
    )


@given(own=quiet_items("i-00000000000000001"), companion=quiet_items("i-00000000000000001"))
def test_a_release_proves_each_of_the_two_items_by_its_own_decision(
    own: BusyState, companion: BusyState
) -> None:
    """Under the isolated scheme with legacy items read, a draining instance's release claims the
    ARN item on its own decision and checks the bare-id companion on the companion's, in one
    transaction; live work on either holds it (no claim at all)."""
    state = replace(own, draining=Draining(NOW - 60, "graph-db", HOOK), legacy=companion)
    progress = planner.first_step(planner.Request(own.instance_id, "graph-db", seen=state), policy())
    decision = decide(state, CONFIG, NOW)
    busy = Reason.BUSY in (decide(own, CONFIG, NOW).reason, decide(companion, CONFIG, NOW).reason)
    assert decision.completes is not busy
    if busy:
        assert not isinstance(progress.step, planner.Claim)
        return
    assert isinstance(progress.step, planner.Claim)
    assert_proof_matches_decision(progress.step, progress)


@given(state=states(), every=st.floats(min_value=0, max_value=900), started=st.none() | times)
def test_a_heartbeat_is_sent_only_when_due(state: BusyState, every: float, started: float | None) -> None:
    state = replace(state, draining=state.draining or Draining(NOW - 100, "graph-db", HOOK), released=None)
    request = planner.Request(state.instance_id, "graph-db", wait_started=started, seen=state)
    progress = planner.first_step(request, policy(every))
    if isinstance(progress.step, planner.Heartbeat):
        known = [
            t for t in (started, state.draining.heartbeat_at if state.draining else None) if t is not None
        ]
        known = [t for t in known if t <= NOW]
        assert not known or NOW - max(known) >= every
        assert not decide(state, CONFIG, NOW).completes


@given(state=states(), every=st.floats(min_value=1, max_value=900))
def test_a_busy_instance_whose_heartbeat_is_not_due_costs_no_call(state: BusyState, every: float) -> None:
    draining = Draining(NOW - 100, "graph-db", HOOK, heartbeat_at=NOW - every / 2)
    state = replace(state, draining=draining, released=None)
    progress = planner.first_step(planner.Request(state.instance_id, "graph-db", seen=state), policy(every))
    if decide(state, CONFIG, NOW).action is Action.WAIT:
        assert isinstance(progress.step, planner.Done) and progress.step.end is planner.End.WAITING


listings = st.dictionaries(
    st.sampled_from([f"i-{n:017x}" for n in range(8)]),
    st.builds(
        GroupInstance,
        asg=st.sampled_from(GROUPS[:1]),
        lifecycle_state=st.sampled_from(
            ["InService", "Terminating:Wait", "Warmed:Pending:Wait", "Warmed:Terminating:Wait"]
        ),
    ),
    max_size=8,
)
table_ids = st.sampled_from([f"i-{n:017x}" for n in range(12)] + ["../x", "i-NOPE", "", "i-" + "f" * 30])


@st.composite
def tables(draw: st.DrawFn) -> dict[str, BusyState]:
    ids = draw(st.lists(table_ids, max_size=12, unique=True))
    return {i: draw(states(i)) for i in ids}


@given(
    listing=listings,
    items=st.none() | tables(),
    max_work=st.integers(min_value=0, max_value=10),
)
def test_a_tick_acts_only_on_valid_ids_of_our_groups_and_at_most_max_work(
    listing: dict[str, GroupInstance], items: dict[str, BusyState] | None, max_work: int
) -> None:
    rules = planner.TickPolicy(asg_names=GROUPS[:1], hook_name=HOOK, heartbeat_timeout=900, max_work=max_work)
    others = {i: BusyState(i) for i in planner.plan_reads(listing, items, rules)}
    plan = planner.plan_tick(listing, items, others, rules, NOW)
    assert len(plan.work) <= max_work
    ids = [request.instance_id for request in plan.work]
    assert len(ids) == len(set(ids))
    for request in plan.work:
        assert request.instance_id in listing or (items and request.instance_id in items)
        seen = request.seen
        if seen is not None and seen.draining is not None:
            assert seen.draining.asg in rules.asg_names and seen.draining.hook in ("", HOOK)
        assert request.asg in rules.asg_names
        assert request.instance_id.startswith("i-") and len(request.instance_id) <= 19
    waiting = sum(1 for w in listing.values() if w.waiting)
    assert len(plan.work) + plan.capped + len(plan.skipped) >= min(waiting, max_work)


def test_the_planner_leaves_the_wait_on_max_wait_even_when_the_table_fails() -> None:
    """The wait is over whatever the table says: a failed claim still completes at max_wait."""
    since = NOW - CONFIG.max_wait - 1
    state = BusyState("i-00000000000000001", exists=True, draining=Draining(since, "graph-db", HOOK))
    state = replace(state, leases=(Lease("a", "bulk", "w", NOW, NOW, NOW + 600),))
    progress = planner.first_step(planner.Request(state.instance_id, "graph-db", seen=state), policy())
    assert isinstance(progress.step, planner.Claim) and progress.step.proof is None
    progress = planner.next_step(progress, planner.Unavailable("down"), policy())
    assert isinstance(progress.step, planner.Complete) and progress.step.result is Action.CONTINUE
    assert settings.MAX_CLAIM_ROUNDS >= 1


def test_a_wait_behind_an_old_release_mark_is_probed_and_adopted_not_skipped() -> None:
    """A warm-pool instance released earlier comes back and terminates again before a tick saw it in
    service (which clears the mark), and that termination's event is lost. Its old release mark
    must not hide the new wait: skipped as "another hook's", the hook would time out (found by the
    model test). Past one HeartbeatTimeout no wait of ours can be the released one (it got no
    heartbeat since), so the tick probes our hook and adopts the wait when the probe is accepted."""
    timeout = 300.0
    rules = planner.TickPolicy(asg_names=GROUPS[:1], hook_name=HOOK, heartbeat_timeout=timeout, max_work=10)
    old = Released(at=NOW - timeout - 100, reason="idle", by="busy-guard")
    instance = "i-00000000000000001"
    state = BusyState(instance, exists=True, released=old)
    for lifecycle_state in ("Terminating:Wait", "Warmed:Pending:Wait"):
        listing = {instance: GroupInstance("graph-db", lifecycle_state)}
        plan = planner.plan_tick(listing, {instance: state}, {}, rules, NOW)
        assert plan.skipped == [] and [r.instance_id for r in plan.work] == [instance]
        [request] = plan.work
        assert request.probe and request.recorded is None

        progress = planner.first_step(request, policy())
        assert isinstance(progress.step, planner.Heartbeat)
        progress = planner.next_step(progress, HookResult.DONE, policy())
        # Ours: the old mark does not count as this wait's release, on the item's condition too.
        assert isinstance(progress.step, planner.ReleaseIfIdle) and progress.step.not_before > old.at
        busy = replace(state, leases=(Lease("a", "bulk", "w", NOW - 60, NOW - 60, NOW + 600),), counter=1)
        progress = planner.next_step(progress, planner.Written(False, busy), policy())
        assert isinstance(progress.step, planner.MarkDraining)
        held = replace(busy, draining=progress.step.draining)
        progress = planner.next_step(progress, held, policy())
        # The probe was this wait's first heartbeat: recorded, so the next is due a third later.
        assert isinstance(progress.step, planner.RecordHeartbeat)

    # Another hook's wait after ours finished: the probe is refused and nothing is recorded.
    probe = planner.first_step(plan.work[0], policy())
    done = planner.next_step(probe, HookResult.NOT_ACTIVE, policy())
    assert isinstance(done.step, planner.Done) and done.step.end is planner.End.SKIPPED


def test_a_release_mark_still_being_completed_is_left_to_its_invocation() -> None:
    """Younger than RECORDED_RELEASE_RETRY_AFTER_SECONDS, the invocation that recorded it is still
    completing it: no call at all."""
    rules = planner.TickPolicy(asg_names=GROUPS[:1], hook_name=HOOK, heartbeat_timeout=300, max_work=10)
    instance = "i-00000000000000001"
    young = Released(at=NOW - settings.RECORDED_RELEASE_RETRY_AFTER_SECONDS + 1, reason="idle", by="g")
    listing = {instance: GroupInstance("graph-db", "Terminating:Wait")}
    plan = planner.plan_tick(
        listing, {instance: BusyState(instance, exists=True, released=young)}, {}, rules, NOW
    )
    assert plan.work == [] and [s.request.instance_id for s in plan.skipped] == [instance]


maintenances = st.builds(
    Maintenance,
    since=times,
    by=st.just("operator"),
    reason=st.just("patching"),
    token=st.text("abcdef", min_size=1, max_size=4),
    forced=st.booleans(),
)


def each_state(value: Any, change: Callable[[BusyState], BusyState]) -> Any:
    """``value`` (a step, an answer, a request, a plan...) with ``change`` applied to every item
    state inside it."""
    if isinstance(value, BusyState):
        return change(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: each_state(getattr(value, f.name), change) for f in dataclasses.fields(value) if f.init
        }
        return replace(value, **fields)
    if isinstance(value, tuple | list):
        return type(value)(each_state(v, change) for v in value)
    if isinstance(value, dict):
        return {k: each_state(v, change) for k, v in value.items()}
    return value


def unmarked(value: Any) -> Any:
    return each_state(value, lambda state: replace(state, maintenance=None))


@given(request=requests(), mark=maintenances, data=st.data())
def test_a_maintenance_mark_changes_no_step_of_the_protocol(
    request: planner.Request, mark: Maintenance, data: st.DataObject
) -> None:
    """The same chain twice, every item the guard sees once without and once with a maintenance
    mark: step for step the same (the mark aside), so maintenance is never taken for a termination,
    never cleared, and never holds or releases anything."""
    rules = policy()

    def marked(value: Any) -> Any:
        return each_state(value, lambda state: replace(state, maintenance=mark))

    plain = planner.first_step(unmarked(request), rules)
    drained = planner.first_step(marked(request), rules)
    for _ in range(MAX_STEPS):
        assert unmarked(drained.step) == plain.step
        assert unmarked(drained.decision) == plain.decision
        if isinstance(plain.step, planner.Done):
            return
        answer = unmarked(answer_for(plain.step, data.draw, request.instance_id))
        plain = planner.next_step(plain, answer, rules)
        drained = planner.next_step(drained, marked(answer), rules)
    raise AssertionError(f"no end after {MAX_STEPS} steps: {plain}")


@given(listing=listings, items=st.none() | tables(), mark=maintenances, data=st.data())
def test_a_maintenance_mark_changes_no_tick_plan(
    listing: dict[str, GroupInstance],
    items: dict[str, BusyState] | None,
    mark: Maintenance,
    data: st.DataObject,
) -> None:
    rules = planner.TickPolicy(asg_names=GROUPS[:1], hook_name=HOOK, heartbeat_timeout=900, max_work=10)
    items = unmarked(items)
    drained_ids = data.draw(st.sets(st.sampled_from(sorted(items)))) if items else set()
    drained = (
        None
        if items is None
        else {i: replace(s, maintenance=mark) if i in drained_ids else s for i, s in items.items()}
    )
    others = {i: BusyState(i) for i in planner.plan_reads(listing, items, rules)}
    assert planner.plan_reads(listing, drained, rules) == list(others)
    plain = planner.plan_tick(listing, items, others, rules, NOW)
    assert unmarked(planner.plan_tick(listing, drained, others, rules, NOW)) == plain
