"""The guard's view of the busy table: a handful of single-item writes and two bulk reads.

Items are keyed through one ``InstanceKeys`` (``busy_guard.keys``): callers speak instance ids, and
the adapter alone knows whether the item is keyed by the instance ARN or the bare id. Under the
isolated scheme with ``read_legacy``, every state handed out for a decision carries the bare-id
companion item (``BusyState.legacy``), and every release that proves a decision proves the companion
in the same ``TransactWriteItems``, so a legacy writer's live lease can never be released under.

Every method raises ``StateUnavailable`` for a DynamoDB failure (after the client's own retries)
so the caller can turn it into a WAIT decision; a conditional failure is an answer, not an error.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from busy_guard import schema, settings
from busy_guard.guard.deadline import NO_DEADLINE, Deadline
from busy_guard.keys import LEGACY, InstanceKeys, is_bare_id
from busy_guard.schema import BusyState, Draining, Maintenance, Proof, Released

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

BATCH_GET_LIMIT = 100  # AWS: BatchGetItem takes at most 100 keys
# What the tick's scan reads of an item: everything ``decide`` and the planner look at, nothing else,
# so a table of junk attributes costs the tick no more than it must.
SCANNED_ATTRIBUTES = (
    schema.INSTANCE_ID,
    schema.LEASES,
    schema.COUNTER,
    schema.LAST_OP_AT,
    schema.DRAINING,
    schema.RELEASED,
    schema.LEGACY_LEASES,
)


class TableUnavailableError(RuntimeError):
    """DynamoDB could not be read or written; the message says why."""


class BusyTable:
    def __init__(
        self,
        client: DynamoDBClient,
        table_name: str,
        *,
        keys: InstanceKeys = LEGACY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self._table = table_name
        self._keys = keys
        self._sleep = sleep

    @property
    def name(self) -> str:
        return self._table

    @property
    def keys(self) -> InstanceKeys:
        return self._keys

    def _key(self, instance_id: str) -> dict[str, dict[str, str]]:
        return schema.key(self._keys.key(instance_id))

    def release_if_idle(
        self, instance_id: str, released: Released, *, ttl: float, not_before: float
    ) -> tuple[bool, BusyState]:
        """(True, state before) when the idle instance is now released; (False, current state).
        With a companion to prove, the state before is not returned (a transaction returns none):
        (True, an empty state)."""
        request = schema.release_if_idle_update(released, ttl=ttl, not_before=not_before)
        return self._proven(instance_id, request, Proof(idle=True))

    def mark_draining(self, instance_id: str, draining: Draining) -> BusyState:
        response = self._call(
            "UpdateItem",
            lambda: self.client.update_item(
                TableName=self._table, Key=self._key(instance_id), **schema.mark_draining_update(draining)
            ),
        )
        return self._with_companion(schema.parse_item(response.get("Attributes"), instance_id))

    def release(
        self,
        instance_id: str,
        released: Released,
        *,
        ttl: float,
        draining_since: float | None,
        proof: Proof | None = None,
    ) -> tuple[bool, BusyState]:
        """Move ``draining`` to ``released``. (False, current state) when the condition failed:
        another trigger released it first, or the item does not prove what the decision claims."""
        request = schema.release_update(released, ttl=ttl, draining_since=draining_since, proof=proof)
        if proof is None:  # max_wait, gone, the operator: the wait ends whatever writers do
            return self._conditional(instance_id, request)
        return self._proven(instance_id, request, proof)

    def record_heartbeat(self, instance_id: str, *, draining_since: float, at: float) -> bool:
        """Note the guard's heartbeat on the draining mark; False when the wait moved on."""
        request = schema.record_heartbeat_update(draining_since=draining_since, at=at)
        done, _state = self._conditional(instance_id, request)
        return done

    def recheck_release(
        self, instance_id: str, released_at: float, *, now: float, proof: Proof
    ) -> tuple[bool, BusyState]:
        """Prove a recorded release again before completing it again; (False, current) otherwise."""
        return self._proven(
            instance_id, schema.recheck_release_update(released_at, now=now, proof=proof), proof
        )

    def confirm_release(self, instance_id: str, released_at: float, *, now: float) -> bool:
        """Mark a recorded release as finished; False when the item moved on meanwhile."""
        done, _state = self._conditional(instance_id, schema.confirm_release_update(released_at, now=now))
        return done

    def clear_release(self, instance_id: str, released_at: float) -> bool:
        """Forget a release mark (the instance is back in service); False if the item moved on."""
        done, _state = self._conditional(instance_id, schema.clear_release_update(released_at))
        return done

    def begin_maintenance(self, instance_id: str, mark: Maintenance) -> tuple[bool, BusyState]:
        """(True, state with the mark) when ``busy-guard drain`` now owns the instance; (False, the
        state holding another drain's mark)."""
        return self._conditional(instance_id, schema.begin_maintenance_update(mark))

    def end_maintenance(
        self, instance_id: str, mark: Maintenance, *, ended_at: float, result: str
    ) -> tuple[bool, BusyState]:
        """Clear this very mark and record the drain; (False, current state) if it is not ours."""
        return self._conditional(
            instance_id, schema.end_maintenance_update(mark, ended_at=ended_at, result=result)
        )

    def get(self, instance_id: str) -> BusyState:
        """The instance's item, with its companion where one is read (one consistent read each)."""
        response = self._call(
            "GetItem",
            lambda: self.client.get_item(
                TableName=self._table, Key=self._key(instance_id), ConsistentRead=True
            ),
        )
        return self._with_companion(schema.parse_item(response.get("Item"), instance_id))

    def _with_companion(self, state: BusyState) -> BusyState:
        """``state`` with its bare-id companion, where one is read and exists (BatchGetItem: the
        guard's role has no GetItem)."""
        legacy_key = self._keys.legacy_key(state.instance_id)
        if legacy_key is None:
            return state
        pair = (state.instance_id, legacy_key)
        companion = self._read_keys([pair], NO_DEADLINE).get(pair)
        return replace(state, legacy=companion) if companion is not None else state

    def _proven(self, instance_id: str, request: dict[str, Any], proof: Proof) -> tuple[bool, BusyState]:
        """A conditional write that proves a decision; with a companion to prove, one transaction:
        the write on the instance's item and a ConditionCheck of the companion's own proof (idle,
        unless the decision was made on a copy of the companion and proves it unchanged). A
        cancelled transaction is answered like a failed condition, with both items read again."""
        legacy_key = self._keys.legacy_key(instance_id)
        if legacy_key is None:
            return self._conditional(instance_id, request)
        update = {
            k: v
            for k, v in request.items()
            if k not in ("ReturnValues", "ReturnValuesOnConditionCheckFailure")
        }
        check = schema.condition_check(proof.legacy or Proof(idle=True))
        items: Any = [
            {"Update": {"TableName": self._table, "Key": self._key(instance_id), **update}},
            {"ConditionCheck": {"TableName": self._table, "Key": schema.key(legacy_key), **check}},
        ]
        try:
            self.client.transact_write_items(TransactItems=items)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "TransactionCanceledException":
                return False, self.get_many([instance_id])[instance_id]
            raise TableUnavailableError(_describe("TransactWriteItems", error)) from error
        except BotoCoreError as error:
            raise TableUnavailableError(_describe("TransactWriteItems", error)) from error
        return True, BusyState(instance_id, key=self._keys.key(instance_id))

    def draining_items(self) -> dict[str, BusyState]:
        """Every item the guard is waiting on, one Scan page per MB of table."""
        return {i: s for i, s in self.marked_items().items() if s.draining is not None}

    def marked_items(self, deadline: Deadline = NO_DEADLINE) -> dict[str, BusyState]:
        """Every item marked draining or released, one Scan page per MB of table, projected to the
        attributes the guard reads."""
        states: dict[str, BusyState] = {}
        names = {f"#a{n}": name for n, name in enumerate(SCANNED_ATTRIBUTES)}
        names.update({"#draining": schema.DRAINING, "#released": schema.RELEASED})
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "FilterExpression": "attribute_exists(#draining) OR attribute_exists(#released)",
            "ProjectionExpression": ", ".join(f"#a{n}" for n in range(len(SCANNED_ATTRIBUTES))),
            "ExpressionAttributeNames": names,
        }
        while True:
            deadline.check_call("Scan")
            page = self._call("Scan", lambda: self.client.scan(**kwargs))
            for item in page.get("Items", []):
                state = _parse_or_none(item)
                if state is None:
                    continue
                if self._keys.owner(state.key) is not None:
                    states[state.instance_id] = state
                elif is_bare_id(state.key):
                    pass  # a bare-id item under the isolated scheme: only ever a companion, read below
                else:
                    # Not a key this scheme makes (junk, or another account's or region's ARN): kept
                    # under its raw key, which the planner rejects and counts.
                    states[state.key] = replace(state, instance_id=state.key)
            if "LastEvaluatedKey" not in page:
                return self._attach_companions(states, deadline)
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _attach_companions(self, states: dict[str, BusyState], deadline: Deadline) -> dict[str, BusyState]:
        """The companions of the draining items, read in batches: a tick decides on both items."""
        if not self._keys.read_legacy:
            return states
        pairs = [
            (i, legacy)
            for i, s in states.items()
            if s.draining is not None and self._keys.owner(s.key) and (legacy := self._keys.legacy_key(i))
        ]
        for (instance_id, _key), companion in self._read_keys(pairs, deadline).items():
            states[instance_id] = replace(states[instance_id], legacy=companion)
        return states

    def get_many(self, instance_ids: Iterable[str], deadline: Deadline = NO_DEADLINE) -> dict[str, BusyState]:
        """Items of many instances, each with its companion where one is read, in BatchGetItems;
        a missing item is an empty state."""
        wanted = list(dict.fromkeys(instance_ids))
        primary = [(i, self._keys.key(i)) for i in wanted]
        companions = [(i, k) for i in wanted if (k := self._keys.legacy_key(i)) is not None]
        found = self._read_keys(primary + companions, deadline)
        states = {i: found.get((i, key)) or BusyState(instance_id=i, key=key) for i, key in primary}
        for pair in companions:
            if pair in found:
                states[pair[0]] = replace(states[pair[0]], legacy=found[pair])
        return states

    def _read_keys(
        self, pairs: list[tuple[str, str]], deadline: Deadline
    ) -> dict[tuple[str, str], BusyState]:
        """(instance id, key) pairs read 100 per BatchGetItem; the existing items' states by pair.

        UnprocessedKeys (throttling, or 16 MB in one response) are asked for again after a
        full-jitter exponential backoff, as AWS asks; botocore's own retries sit under each call."""
        owners = {key: instance_id for instance_id, key in pairs}
        found: dict[tuple[str, str], BusyState] = {}
        for start in range(0, len(pairs), BATCH_GET_LIMIT):
            keys: list[Any] = [schema.key(key) for _i, key in pairs[start : start + BATCH_GET_LIMIT]]
            for attempt in range(settings.BATCH_GET_ATTEMPTS):
                if attempt:
                    self._backoff(attempt, deadline)
                deadline.check_call("BatchGetItem")
                request: Any = {self._table: {"Keys": keys, "ConsistentRead": True}}
                response = self._call(
                    "BatchGetItem", lambda r=request: self.client.batch_get_item(RequestItems=r)
                )
                for item in response.get("Responses", {}).get(self._table, []):
                    state = _parse_or_none(item)
                    if state is not None and state.key in owners:
                        found[(owners[state.key], state.key)] = state
                keys = response.get("UnprocessedKeys", {}).get(self._table, {}).get("Keys", [])
                if not keys:
                    break
            else:
                left, tries = len(keys), settings.BATCH_GET_ATTEMPTS
                raise TableUnavailableError(f"BatchGetItem left {left} keys unprocessed after {tries} tries")
        return found

    def _backoff(self, attempt: int, deadline: Deadline) -> None:
        base, cap = settings.BATCH_GET_BACKOFF_SECONDS
        delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))  # noqa: S311 - jitter, not crypto
        if not deadline.allows(delay + settings.aws_call_budget_seconds()):
            raise TableUnavailableError("BatchGetItem: no time left to ask again for its unprocessed keys")
        self._sleep(delay)

    def _conditional(self, instance_id: str, request: dict[str, Any]) -> tuple[bool, BusyState]:
        try:
            response = self.client.update_item(TableName=self._table, Key=self._key(instance_id), **request)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                old_item: Any = error.response.get("Item")
                return False, schema.parse_item(old_item, instance_id)
            raise TableUnavailableError(_describe("UpdateItem", error)) from error
        except BotoCoreError as error:
            raise TableUnavailableError(_describe("UpdateItem", error)) from error
        return True, schema.parse_item(response.get("Attributes"), instance_id)

    def _call(self, operation: str, call: Any) -> Any:
        try:
            return call()
        except (ClientError, BotoCoreError) as error:
            raise TableUnavailableError(_describe(operation, error)) from error


def _parse_or_none(item: Any) -> BusyState | None:
    try:
        return schema.parse_item(item)
    except schema.SchemaError:
        return None


def _describe(operation: str, error: Exception) -> str:
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        return f"DynamoDB {operation} failed: {info.get('Code', '?')}: {info.get('Message', '')}"[:300]
    return f"DynamoDB {operation} failed: {type(error).__name__}: {error}"[:300]
