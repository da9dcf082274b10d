"""The guard's view of the busy table: a handful of single-item writes and two bulk reads.

Every method raises ``StateUnavailable`` for a DynamoDB failure (after the client's own retries)
so the caller can turn it into a WAIT decision; a conditional failure is an answer, not an error.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from busy_guard import schema, settings
from busy_guard.guard.deadline import NO_DEADLINE, Deadline
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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self._table = table_name
        self._sleep = sleep

    @property
    def name(self) -> str:
        return self._table

    def release_if_idle(
        self, instance_id: str, released: Released, *, ttl: float, not_before: float
    ) -> tuple[bool, BusyState]:
        """(True, state before) when the idle instance is now released; (False, current state)."""
        request = schema.release_if_idle_update(released, ttl=ttl, not_before=not_before)
        return self._conditional(instance_id, request)

    def mark_draining(self, instance_id: str, draining: Draining) -> BusyState:
        response = self._call(
            "UpdateItem",
            lambda: self.client.update_item(
                TableName=self._table, Key=schema.key(instance_id), **schema.mark_draining_update(draining)
            ),
        )
        return schema.parse_item(response.get("Attributes"), instance_id)

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
        return self._conditional(instance_id, request)

    def record_heartbeat(self, instance_id: str, *, draining_since: float, at: float) -> bool:
        """Note the guard's heartbeat on the draining mark; False when the wait moved on."""
        request = schema.record_heartbeat_update(draining_since=draining_since, at=at)
        done, _state = self._conditional(instance_id, request)
        return done

    def recheck_release(
        self, instance_id: str, released_at: float, *, now: float, proof: Proof
    ) -> tuple[bool, BusyState]:
        """Prove a recorded release again before completing it again; (False, current) otherwise."""
        return self._conditional(
            instance_id, schema.recheck_release_update(released_at, now=now, proof=proof)
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
        response = self._call(
            "GetItem",
            lambda: self.client.get_item(
                TableName=self._table, Key=schema.key(instance_id), ConsistentRead=True
            ),
        )
        return schema.parse_item(response.get("Item"), instance_id)

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
                if state is not None:
                    states[state.instance_id] = state
            if "LastEvaluatedKey" not in page:
                return states
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def get_many(self, instance_ids: Iterable[str], deadline: Deadline = NO_DEADLINE) -> dict[str, BusyState]:
        """Items of many instances, 100 per BatchGetItem; a missing item is an empty state.

        UnprocessedKeys (throttling, or 16 MB in one response) are asked for again after a
        full-jitter exponential backoff, as AWS asks; botocore's own retries sit under each call."""
        wanted = list(dict.fromkeys(instance_ids))
        states = {instance_id: BusyState(instance_id=instance_id) for instance_id in wanted}
        for start in range(0, len(wanted), BATCH_GET_LIMIT):
            keys: list[Any] = [schema.key(i) for i in wanted[start : start + BATCH_GET_LIMIT]]
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
                    if state is not None:
                        states[state.instance_id] = state
                keys = response.get("UnprocessedKeys", {}).get(self._table, {}).get("Keys", [])
                if not keys:
                    break
            else:
                left, tries = len(keys), settings.BATCH_GET_ATTEMPTS
                raise TableUnavailableError(f"BatchGetItem left {left} keys unprocessed after {tries} tries")
        return states

    def _backoff(self, attempt: int, deadline: Deadline) -> None:
        base, cap = settings.BATCH_GET_BACKOFF_SECONDS
        delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))  # noqa: S311 - jitter, not crypto
        if not deadline.allows(delay + settings.aws_call_budget_seconds()):
            raise TableUnavailableError("BatchGetItem: no time left to ask again for its unprocessed keys")
        self._sleep(delay)

    def _conditional(self, instance_id: str, request: dict[str, Any]) -> tuple[bool, BusyState]:
        try:
            response = self.client.update_item(TableName=self._table, Key=schema.key(instance_id), **request)
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
