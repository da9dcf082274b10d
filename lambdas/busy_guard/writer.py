"""The writer library: mark destructive work on this instance so the guard waits for it.

    async with instance_busy(instance_id, OP_KIND_BULK_TABLE_INSERT):
        ...

Every operation holds its own lease on the instance's item (DESIGN.md, "The table"), renewed by a
background heartbeat while the body runs: a daemon thread for the sync and the async API alike (a
body that blocks the event loop must not starve it). The library never blocks real work: a
DynamoDB failure of any kind is logged and the body runs without a lease; the boto3 client has
short timeouts and one retry, so a dead endpoint costs ``begin`` about a second. The one
deliberate refusal is a new lease on an instance the guard is draining (``InstanceDrainingError``,
or a warning with ``on_draining="warn"``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeGuard, Unpack, cast

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from busy_guard import identity, schema
from busy_guard.settings import (
    DEFAULT_KEY_SCHEME,
    KEY_SCHEME_ISOLATED,
    KEY_SCHEME_LEGACY,
    KEY_SCHEMES,
    LEASE_HEARTBEAT_SECONDS,
    LEASE_TTL_SECONDS,
    MAX_KIND_LENGTH,
    MAX_LOGGED_CHARS,
    WRITER_MAX_POOL_CONNECTIONS,
    Env,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

logger = logging.getLogger("busy_guard.writer")

# The kinds the replaced system used; any other string is accepted too.
OP_KIND_MATERIALIZATION = "materialization"
OP_KIND_DAGSTER_MATERIALIZATION = "dagster_materialization"
OP_KIND_SEC_STAGING = "sec_staging"
OP_KIND_EXTENSIONS_MATERIALIZE = "extensions_materialize"
OP_KIND_BULK_TABLE_CREATE = "bulk_table_create"
OP_KIND_BULK_TABLE_INSERT = "bulk_table_insert"

ENV_TABLE = Env.TABLE
ENV_ENDPOINT_URL = Env.ENDPOINT_URL
DEFAULT_HEARTBEAT_INTERVAL = float(LEASE_HEARTBEAT_SECONDS)
DEFAULT_LEASE_TTL = float(LEASE_TTL_SECONDS)

# Worst case per call against an endpoint that accepts and never answers: two attempts of 0.5 s
# plus botocore's DynamoDB backoff (at most 25 ms before the first retry) -- about a second.
CLIENT_CONFIG = Config(
    connect_timeout=0.5,
    read_timeout=0.5,
    retries={"total_max_attempts": 2, "mode": "standard"},
    # One process may begin and end many operations at once (threads, the async API's executor):
    # a pool smaller than that discards connections ("Connection pool is full") and reconnects.
    max_pool_connections=WRITER_MAX_POOL_CONNECTIONS,
)
# A lease this long past its expiry belongs to a process that is gone: the guard has judged it
# stale for minutes already. Begin removes up to this many such leases.
ORPHAN_AFTER = 300.0
MAX_PRUNED_PER_BEGIN = 10
# Longer than one heartbeat call can take with CLIENT_CONFIG (two 0.5 s attempts and a backoff).
HEARTBEAT_JOIN_TIMEOUT = 2.0
# Begin needs at most: add to the map, create the map, add again (lost a race to create it).
_BEGIN_TRIES = 3

OnDraining = Literal["raise", "warn"]
_ON_DRAINING: tuple[str, ...] = ("raise", "warn")


class WriterOptions(TypedDict, total=False):
    """Keyword options every writer entry point takes (``begin_*``, ``instance_busy*``).

    table               the busy table; default ``$BUSY_GUARD_TABLE``
    on_draining         "raise" (``InstanceDrainingError``, default) or "warn" (run without a lease)
    heartbeat_interval  seconds between lease renewals; default 60
    lease_ttl           seconds a lease lives without renewal; default 180, > heartbeat_interval
    client              a boto3 DynamoDB client to use instead of the library's own
    clock               epoch seconds, ``time.time`` by default (tests)
    endpoint_url        default ``$BUSY_GUARD_ENDPOINT_URL`` (DynamoDB Local, moto_server)
    key_scheme          "isolated" (items keyed by the instance ARN) or "legacy" (bare ids); default
                        ``$BUSY_GUARD_KEY_SCHEME``, else "isolated". Must match the stack's KeyScheme.
    """

    table: str | None
    on_draining: OnDraining
    heartbeat_interval: float
    lease_ttl: float
    client: DynamoDBClient | None
    clock: Callable[[], float] | None
    endpoint_url: str | None
    key_scheme: str | None


class InstanceDrainingError(RuntimeError):
    """The guard is draining this instance for termination, or an operator for maintenance
    (``busy-guard drain``): no new destructive operation may start."""

    def __init__(self, instance_id: str, state: schema.BusyState) -> None:
        self.instance_id = instance_id
        self.draining = state.draining
        self.released = state.released
        self.maintenance = state.maintenance
        if state.draining is not None:
            why = f"draining since {schema.iso(state.draining.since)}"
            if state.draining.asg:
                why += f" (group {state.draining.asg}, hook {state.draining.hook})"
        elif state.maintenance is not None:
            mark = state.maintenance
            why = (
                f"in maintenance since {schema.iso(mark.since)} (busy-guard drain by {mark.by[:128] or '?'})"
            )
        elif state.released is not None:
            why = f"released for termination at {schema.iso(state.released.at)}"
        else:
            why = "draining"
        super().__init__(f"instance {instance_id} is {why}: refusing to start a destructive operation")


@dataclass(eq=False)
class LeaseHandle:
    """One recorded lease. Pass it to ``end_destructive_op``; its heartbeat runs until then."""

    lease_id: str
    instance_id: str
    kind: str
    table: str
    _writer: _Writer = field(repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    key: str = ""  # the item's key: the instance ARN (isolated) or ``instance_id`` (legacy)

    @property
    def heartbeat_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _stop_heartbeat(self) -> None:
        self._stop.set()


class _Refused(Exception):
    """Internal signal from ``_record``: the item says the instance is draining."""

    def __init__(self, state: schema.BusyState) -> None:
        self.state = state


# --- clients: created lazily, one per (region, endpoint) ----------------------------------------
_clients: dict[tuple[str | None, str | None], DynamoDBClient] = {}
_state_lock = threading.Lock()
_session: boto3.session.Session | None = None
_logged_once: set[str] = set()


def env_region() -> str | None:
    """``AWS_REGION`` (what Lambda, the other SDKs and this library read), else botocore's own
    ``AWS_DEFAULT_REGION``."""
    return (
        os.environ.get("AWS_REGION", "").strip() or os.environ.get("AWS_DEFAULT_REGION", "").strip() or None
    )


def resolve_region(session_region: str | None, endpoint_url: str | None) -> str | None:
    """The region the writer's client uses: the environment, else the session's (profile), else,
    on EC2 with no region configured anywhere, the instance's own from IMDS. None only off EC2
    (or with an endpoint override, which needs no real region). The CLI's ``run`` uses it too."""
    region = env_region() or session_region
    if region is None and endpoint_url is None:
        region = identity.imds_region()
    return region


def _shared_client(endpoint_url: str | None) -> DynamoDBClient:
    global _session  # noqa: PLW0603 - lazily created, never at import
    region = env_region()
    cache_key = (region, endpoint_url)
    with _state_lock:
        client = _clients.get(cache_key)
        if client is None:
            # One private session, used under the lock (sessions are not thread-safe): later
            # clients reuse its loaded service models instead of parsing them again.
            _session = _session or boto3.session.Session()
            region = resolve_region(_session.region_name, endpoint_url)
            client = _session.client(
                "dynamodb", region_name=region, endpoint_url=endpoint_url, config=CLIENT_CONFIG
            )
            _clients[cache_key] = client
        return client


def reset_caches() -> None:
    """Forget cached clients and once-only log state (tests, or after changing the environment)."""
    global _session  # noqa: PLW0603
    with _state_lock:
        _clients.clear()
        _logged_once.clear()
        _session = None


def _log_once(key: str, level: int, message: str, *args: object) -> None:
    with _state_lock:
        first = key not in _logged_once
        _logged_once.add(key)
    logger.log(level if first else logging.DEBUG, message, *args)


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _old_item(err: ClientError) -> schema.Item:
    """The item as it was when a condition failed (``ReturnValuesOnConditionCheckFailure``)."""
    item = cast(Mapping[str, Any], err.response).get("Item")
    return item if isinstance(item, Mapping) else {}


def _describe(err: BaseException) -> str:
    return _shown(f"{type(err).__name__}: {err}", 4 * MAX_LOGGED_CHARS)


def _shown(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """A caller- or item-supplied string as a log line shows it: bounded, and marked when cut."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# --- the writer: configuration plus the three DynamoDB calls ------------------------------------
@dataclass(frozen=True)
class _Writer:
    table: str | None
    on_draining: OnDraining
    heartbeat_interval: float
    lease_ttl: float
    clock: Callable[[], float]
    client: DynamoDBClient | None
    endpoint_url: str | None
    key_scheme: str = DEFAULT_KEY_SCHEME

    @classmethod
    def configure(
        cls,
        *,
        table: str | None = None,
        on_draining: str = "raise",
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        client: DynamoDBClient | None = None,
        clock: Callable[[], float] | None = None,
        endpoint_url: str | None = None,
        key_scheme: str | None = None,
    ) -> _Writer:
        """Validate the arguments (a ``ValueError`` is a bug at the call site) and read the
        environment. No I/O."""
        if on_draining not in _ON_DRAINING:
            raise ValueError(f"on_draining must be one of {_ON_DRAINING}, not {on_draining!r}")
        if not (math.isfinite(heartbeat_interval) and heartbeat_interval > 0):
            raise ValueError(
                f"heartbeat_interval must be a positive number of seconds, not {heartbeat_interval}"
            )
        if not (math.isfinite(lease_ttl) and lease_ttl > heartbeat_interval):
            raise ValueError(
                f"lease_ttl ({lease_ttl}) must be longer than heartbeat_interval ({heartbeat_interval})"
            )
        scheme = key_scheme or os.environ.get(Env.KEY_SCHEME, "").strip() or DEFAULT_KEY_SCHEME
        if scheme not in KEY_SCHEMES:
            raise ValueError(
                f"key_scheme ({Env.KEY_SCHEME}) must be one of {KEY_SCHEMES}, not {scheme[:64]!r}"
            )
        return cls(
            key_scheme=scheme,
            table=table or os.environ.get(ENV_TABLE, "").strip() or None,
            on_draining="warn" if on_draining == "warn" else "raise",
            heartbeat_interval=float(heartbeat_interval),
            lease_ttl=float(lease_ttl),
            clock=clock or time.time,
            client=client,
            endpoint_url=endpoint_url or os.environ.get(ENV_ENDPOINT_URL, "").strip() or None,
        )

    def _client(self) -> DynamoDBClient:
        return self.client if self.client is not None else _shared_client(self.endpoint_url)

    def _update(self, key: str, request: schema.UpdateRequest) -> Any:
        """One UpdateItem on the item keyed ``key`` (``identity.resolve_key``)."""
        assert self.table is not None
        return self._client().update_item(TableName=self.table, Key=schema.key(key), **request)

    # --- begin -----------------------------------------------------------------------------------
    def begin(self, instance_id: str | None, kind: str) -> LeaseHandle | None:
        """Record a lease; None when none was taken (the body then runs unprotected).

        Blocking: the async API runs it in a thread. Raises only ``InstanceDrainingError``.
        """
        if len(kind) > MAX_KIND_LENGTH:
            logger.warning(
                "busy_guard: lease kind %r is %d characters long; stored as its first %d",
                _shown(kind),
                len(kind),
                MAX_KIND_LENGTH,
            )
            kind = kind[:MAX_KIND_LENGTH]
        try:
            resolved, key = identity.resolve_key(instance_id, self.key_scheme)
        except identity.InvalidInstanceIdError as err:
            if err.source == identity.SOURCE_ARGUMENT:
                raise  # a bug at the call site, like any other invalid argument: before any write
            # A bad BUSY_GUARD_INSTANCE_ID is a config bug: said loudly, but real work still runs.
            _log_once(
                f"invalid-id:{err}", logging.ERROR, "busy_guard: %s; %s runs without a lease", err, kind
            )
            return None
        except Exception as err:  # never let identity lookup break real work
            resolved = key = ""
            logger.warning("busy_guard: could not resolve the instance id (%s)", _describe(err))
        if not resolved:
            _log_once(
                "no-instance-id",
                logging.WARNING,
                "busy_guard: no instance id (argument, %s or IMDS): %s runs without a lease",
                identity.ENV_INSTANCE_ID,
                _shown(kind),
            )
            return None
        if not key:
            _log_once(
                "no-instance-arn",
                logging.WARNING,
                "busy_guard: %s=isolated keys leases by the instance ARN, and none was found (an ARN "
                "argument, %s, or IMDS): %s runs without a lease; a legacy table needs %s=legacy",
                Env.KEY_SCHEME,
                Env.INSTANCE_ARN,
                _shown(kind),
                Env.KEY_SCHEME,
            )
            return None
        if self.table is None:
            _log_once(
                "no-table",
                logging.ERROR,
                "busy_guard: no table name (argument or %s): %s runs without a lease; fix the config",
                ENV_TABLE,
                _shown(kind),
            )
            return None
        now = self.clock()
        holder = f"{socket.gethostname()}:{os.getpid()}"  # per call: a forked child has its own pid
        lease = schema.Lease(uuid.uuid4().hex, kind, holder, now, now, now + self.lease_ttl)
        try:
            recorded = self._record(key, lease)
        except _Refused as refused:
            if self.on_draining == "raise":
                raise InstanceDrainingError(resolved, refused.state) from None
            logger.warning(
                "busy_guard: %s; on_draining='warn', so %s runs anyway, without a lease",
                _shown(str(InstanceDrainingError(resolved, refused.state)), 4 * MAX_LOGGED_CHARS),
                _shown(kind),
            )
            return None
        except Exception as err:
            logger.warning(
                "busy_guard: begin of %s on %s failed (%s); the operation runs without a lease",
                _shown(kind),
                _shown(resolved),
                _describe(err),
            )
            if isinstance(err, ClientError) and _error_code(err) == "AccessDeniedException":
                _log_once("access-denied", logging.ERROR, "busy_guard: %s", self._access_hint())
            return None
        if not recorded:
            return None
        logger.debug(
            "busy_guard: lease %s (%s) recorded on %s", lease.lease_id, _shown(kind), _shown(resolved)
        )
        return LeaseHandle(lease.lease_id, resolved, kind, self.table, self, key=key)

    def _access_hint(self) -> str:
        """What an AccessDenied on the lease's item most likely means, by key scheme."""
        if self.key_scheme == KEY_SCHEME_ISOLATED:
            return (
                "access denied: the writers' policy lets an instance update only the item keyed by its "
                "own ARN, and only with its instance profile's credentials (a container task role or an "
                f"assumed role carries no ec2:SourceInstanceARN); a table still on bare ids needs "
                f"{Env.KEY_SCHEME}={KEY_SCHEME_LEGACY}"
            )
        return (
            f"access denied: attach the stack's WriterPolicyArn to this instance's role; a stack with "
            f"KeyScheme=isolated needs {Env.KEY_SCHEME}={KEY_SCHEME_ISOLATED}"
        )

    def _record(self, key: str, lease: schema.Lease) -> bool:
        boot = identity.boot_time()
        create_map = False
        repaired = False
        old: schema.Item = {}
        tries = 0
        while tries < _BEGIN_TRIES + repaired:  # the repair of a string counter earns one more try
            tries += 1
            try:
                request = schema.begin_update(lease, boot_time=boot, create_map=create_map)
                previous = self._update(key, request).get("Attributes")
                self._prune_orphans(key, schema.parse_item(previous, key), lease.started_at)
                return True
            except ClientError as err:
                code = _error_code(err)
                if code == "ValidationException" and "document path" in str(err).lower():
                    create_map = True  # how real DynamoDB may report SET leases.#id without a map
                    continue
                if (
                    code == "ValidationException"
                    and "incorrect data type" in str(err).lower()
                    and not repaired
                ):
                    # ADD on a counter that is not a number (a string): repair it, then take the lease.
                    repaired = True
                    self._repair_counter(key, lease.lease_id)
                    continue
                if code != "ConditionalCheckFailedException":
                    raise
                old = _old_item(err)
            state = schema.parse_item(old, key)
            if any(existing.lease_id == lease.lease_id for existing in state.leases):
                return True  # a retried request whose first attempt had landed
            refused = state.draining is not None or state.maintenance is not None
            if refused or (state.released is not None and state.released.at >= boot):
                raise _Refused(state)
            # Otherwise the map's presence was not what this form assumed (new item, guard-made
            # item, or a concurrent begin created it first): switch forms.
            create_map = schema.LEASES not in old
        logger.warning(
            "busy_guard: begin of %s on %s gave up after %d conflicting tries (item problems: %s); "
            "the operation runs without a lease",
            _shown(lease.kind),
            _shown(key),
            _BEGIN_TRIES,
            _shown("; ".join(schema.parse_item(old, key).problems) or "none", 4 * MAX_LOGGED_CHARS),
        )
        return False

    def _repair_counter(self, key: str, lease_id: str) -> None:
        """Make a string-typed counter a number again (``schema.repair_counter_update``), so that
        this begin and every later one can count. Conditioned on the type and the string seen; a
        counter that changed meanwhile is left to the caller's next try."""
        try:
            self._update(key, schema.counter_probe_update())
            return  # a number by now: another writer repaired it
        except ClientError as err:
            if _error_code(err) != "ConditionalCheckFailedException":
                raise
            old = _old_item(err)
        raw = old.get(schema.COUNTER, {}).get("S") if isinstance(old.get(schema.COUNTER), Mapping) else None
        if not isinstance(raw, str):
            return  # gone, or of a type this repair does not know: the next try says what happens
        value = schema.repaired_counter(schema.parse_item(old, key), raw, lease_id)
        try:
            self._update(key, schema.repair_counter_update(raw, value))
        except ClientError as err:
            if _error_code(err) != "ConditionalCheckFailedException":
                raise
            return
        logger.warning(
            "busy_guard: %s on %s was the string %r, not a number; repaired to %d",
            schema.COUNTER,
            _shown(key),
            _shown(raw),
            value,
        )

    def _prune_orphans(self, key: str, state: schema.BusyState, now: float) -> None:
        """Remove leases whose processes stopped renewing long ago (never a live one: the removal
        is conditioned on the expiry this begin saw). Best effort; only when there are any."""
        orphans = [lease for lease in state.leases if lease.expires_at + ORPHAN_AFTER < now]
        for orphan in orphans[:MAX_PRUNED_PER_BEGIN]:
            try:
                self._update(key, schema.prune_lease_update(orphan))
                logger.info(
                    "busy_guard: removed the expired lease %s (%s) of %s on %s",
                    orphan.lease_id[:64],
                    orphan.kind[:64],
                    orphan.holder[:64],
                    key,
                )
            except Exception as err:  # renewed meanwhile, or DynamoDB trouble: leave it to expire
                logger.debug(
                    "busy_guard: expired lease %s not removed (%s)", orphan.lease_id[:64], _describe(err)
                )

    # --- heartbeat and end ----------------------------------------------------------------------
    def heartbeat(self, handle: LeaseHandle) -> bool:
        """Renew the lease once. False when the heartbeat should stop (the lease is gone)."""
        now = self.clock()
        request = schema.heartbeat_update(handle.lease_id, now=now, expires_at=now + self.lease_ttl)
        try:
            self._update(handle.key, request)
            return True
        except ClientError as err:
            if _error_code(err) != "ConditionalCheckFailedException":
                failure: Exception = err
            else:
                if not handle._stop.is_set():  # racing our own end is normal; anything else is not
                    logger.warning(
                        "busy_guard: lease %s (%s) is no longer on %s (removed by an operator?); "
                        "its heartbeat stops, the operation continues",
                        handle.lease_id,
                        handle.kind,
                        handle.instance_id,
                    )
                return False
        except Exception as err:
            failure = err
        logger.warning(
            "busy_guard: heartbeat of lease %s on %s failed (%s); retrying in %.0f s",
            handle.lease_id,
            handle.instance_id,
            _describe(failure),
            self.heartbeat_interval,
        )
        return True

    def end(self, handle: LeaseHandle) -> None:
        """Stop the heartbeat and remove the lease. Never raises."""
        handle._stop_heartbeat()
        thread = handle._thread
        if thread is not None and thread is not threading.current_thread():
            # A renewal in flight is bounded by the client's timeouts: let it land before the end.
            thread.join(timeout=HEARTBEAT_JOIN_TIMEOUT)
        request = schema.end_update(handle.lease_id, kind=handle.kind, now=self.clock())
        try:
            self._update(handle.key, request)
            return
        except ClientError as err:
            if _error_code(err) != "ConditionalCheckFailedException":
                failure: Exception = err
            else:
                # Never recorded, or removed by someone else: the condition kept the counter from
                # dropping below the lease count. Expected, so not a warning.
                logger.info(
                    "busy_guard: lease %s (%s) was not on %s at end; nothing to remove",
                    handle.lease_id,
                    handle.kind,
                    handle.instance_id,
                )
                return
        except Exception as err:
            failure = err
        logger.warning(
            "busy_guard: end of lease %s (%s) on %s failed (%s); it expires on its own within %.0f s",
            handle.lease_id,
            handle.kind,
            handle.instance_id,
            _describe(failure),
            self.lease_ttl,
        )

    # --- heartbeat loops ------------------------------------------------------------------------
    def start_thread(self, handle: LeaseHandle) -> None:
        def run() -> None:
            # Event.wait, not sleep: the thread ends as soon as the body does.
            while not handle._stop.wait(self.heartbeat_interval):
                if not self.heartbeat(handle):
                    return

        handle._thread = threading.Thread(
            target=run, name=f"busy-guard-heartbeat-{handle.lease_id[:8]}", daemon=True
        )
        handle._thread.start()


class _AbandonableBegin:
    """A begin in a worker thread whose async caller may be cancelled while it runs.

    The thread cannot be stopped, so its write may land after the caller has gone. Whichever of
    the two finishes second releases that lease at once instead of leaving it to expire.
    """

    def __init__(self, writer: _Writer, instance_id: str | None, kind: str) -> None:
        self._writer = writer
        self._instance_id = instance_id
        self._kind = kind
        self._lock = threading.Lock()
        self._abandoned = False
        self._handle: LeaseHandle | None = None

    def run(self) -> LeaseHandle | None:
        handle = self._writer.begin(self._instance_id, self._kind)
        with self._lock:
            if not self._abandoned:
                self._handle = handle
                return handle
        if handle is not None:
            self._writer.end(handle)
        return None

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            handle, self._handle = self._handle, None
        if handle is not None:  # the thread finished first; don't block the event loop on the end
            threading.Thread(
                target=self._writer.end, args=(handle,), name="busy-guard-end", daemon=True
            ).start()


def _endable(lease: object, instance_id: str | None) -> TypeGuard[LeaseHandle]:
    """Whether ``lease`` is a handle to end. Ends run in ``finally`` blocks, so a wrong argument is
    logged, never raised: it would replace the body's own exception."""
    if lease is None:
        return False
    if not isinstance(lease, LeaseHandle):
        logger.error(
            "busy_guard: end_destructive_op needs the handle begin_destructive_op returned, not %s",
            type(lease).__name__,
        )
        return False
    if instance_id and instance_id != lease.instance_id:
        logger.debug(
            "busy_guard: end for %s with a lease of %s; using the lease's", instance_id, lease.instance_id
        )
    return True


# --- the public API ------------------------------------------------------------------------------
async def begin_destructive_op(
    instance_id: str | None = None,
    op_kind: str = OP_KIND_MATERIALIZATION,
    **options: Unpack[WriterOptions],
) -> LeaseHandle | None:
    """Take a lease for an operation on this instance and start its heartbeat.

    The heartbeat is a daemon thread here too, not an asyncio task: a body that blocks the event
    loop, or fills its default executor, must never starve the renewals and make live work look
    stale to the guard.

    Returns the handle to pass to ``end_destructive_op``, or None when no lease was taken: an
    empty or unknown instance id, no table name configured (logged as an error once: a config bug,
    but real work is never blocked for it), any DynamoDB failure, or ``on_draining="warn"`` on a
    draining instance. Raises ``InstanceDrainingError`` when the instance is draining (default),
    and ``ValueError`` for invalid arguments, among them an ``instance_id`` that is not an EC2
    instance id (``identity.InvalidInstanceIdError``). A malformed ``BUSY_GUARD_INSTANCE_ID`` is
    logged as an error instead and the operation runs without a lease. The DynamoDB call runs in a
    worker thread.
    """
    writer = _Writer.configure(**options)
    begin = _AbandonableBegin(writer, instance_id, op_kind)
    try:
        handle = await asyncio.to_thread(begin.run)
    except asyncio.CancelledError:
        begin.abandon()
        raise
    if handle is not None:
        writer.start_thread(handle)
    return handle


async def end_destructive_op(instance_id: str | None, lease: LeaseHandle | None) -> None:
    """Stop the lease's heartbeat and remove it. Never raises; ``lease=None`` is a no-op.

    ``instance_id`` is accepted for call-site compatibility; the lease knows its instance.
    """
    if not _endable(lease, instance_id):
        return
    lease._stop_heartbeat()
    await asyncio.to_thread(lease._writer.end, lease)


def begin_destructive_op_sync(
    instance_id: str | None = None,
    op_kind: str = OP_KIND_MATERIALIZATION,
    **options: Unpack[WriterOptions],
) -> LeaseHandle | None:
    """``begin_destructive_op`` for sync code: the heartbeat is a daemon thread."""
    writer = _Writer.configure(**options)
    handle = writer.begin(instance_id, op_kind)
    if handle is not None:
        writer.start_thread(handle)
    return handle


def end_destructive_op_sync(instance_id: str | None, lease: LeaseHandle | None) -> None:
    """``end_destructive_op`` for sync code. Never raises; ``lease=None`` is a no-op."""
    if _endable(lease, instance_id):
        lease._writer.end(lease)


@asynccontextmanager
async def instance_busy(
    instance_id: str | None = None,
    op_kind: str = OP_KIND_MATERIALIZATION,
    **options: Unpack[WriterOptions],
) -> AsyncIterator[LeaseHandle | None]:
    """Hold a lease while the body runs: ``async with instance_busy(instance_id, op_kind): ...``.

    Yields the lease handle, or None when the body runs without one (see ``begin_destructive_op``;
    a missing table name is logged as an error once and the body still runs). The lease is removed
    however the body ends, cancellation included; the body's exception propagates unchanged.
    Raises ``InstanceDrainingError`` before the body when the instance is draining, unless
    ``on_draining="warn"``.
    """
    handle = await begin_destructive_op(instance_id, op_kind, **options)
    try:
        yield handle
    finally:
        await end_destructive_op(instance_id, handle)


@contextmanager
def instance_busy_sync(
    instance_id: str | None = None,
    op_kind: str = OP_KIND_MATERIALIZATION,
    **options: Unpack[WriterOptions],
) -> Iterator[LeaseHandle | None]:
    """``instance_busy`` for sync code: ``with instance_busy_sync(instance_id, op_kind): ...``."""
    handle = begin_destructive_op_sync(instance_id, op_kind, **options)
    try:
        yield handle
    finally:
        end_destructive_op_sync(instance_id, handle)


__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_LEASE_TTL",
    "ENV_ENDPOINT_URL",
    "ENV_TABLE",
    "OP_KIND_BULK_TABLE_CREATE",
    "OP_KIND_BULK_TABLE_INSERT",
    "OP_KIND_DAGSTER_MATERIALIZATION",
    "OP_KIND_EXTENSIONS_MATERIALIZE",
    "OP_KIND_MATERIALIZATION",
    "OP_KIND_SEC_STAGING",
    "InstanceDrainingError",
    "LeaseHandle",
    "WriterOptions",
    "begin_destructive_op",
    "begin_destructive_op_sync",
    "end_destructive_op",
    "end_destructive_op_sync",
    "instance_busy",
    "instance_busy_sync",
]
