"""Every setting's name, default and limit, defined once.

The guard Lambda (``guard/config.py``), the CLI, the writer and the CDK app (``infra/``) all import
this module; none of them spells an environment variable or a range of its own. Pure constants: no
I/O, no third-party imports, so the writer (boto3 only) and the CDK app can import it too.
"""

from __future__ import annotations

from typing import Final

# --- AWS facts (DESIGN.md, "AWS facts the design relies on") ---------------------------------------
HEARTBEAT_TIMEOUT_RANGE: Final = (30, 7200)
"""A lifecycle hook's HeartbeatTimeout, in seconds, as the Auto Scaling API accepts it."""
MAX_HEARTBEATS: Final = 100
"""An instance waits at most 100 x HeartbeatTimeout ..."""
MAX_INSTANCE_WAIT_SECONDS: Final = 48 * 3600
"""... and never more than 48 hours, however often it is heartbeaten."""


def global_wait_limit_seconds(heartbeat_timeout_seconds: int) -> int:
    """The longest Auto Scaling lets any instance wait with this HeartbeatTimeout."""
    return min(MAX_HEARTBEATS * heartbeat_timeout_seconds, MAX_INSTANCE_WAIT_SECONDS)


def max_wait_limit_seconds(heartbeat_timeout_seconds: int) -> int:
    """The longest ``max_wait`` may be: the global limit less one HeartbeatTimeout.

    The guard notices ``max_wait`` at a tick and the hook's last heartbeat may be almost a whole
    HeartbeatTimeout old by then, so one HeartbeatTimeout of margin lets ``maxWaitResult`` (and its
    alarm) always act before Auto Scaling's own global timeout ends the wait with ``DefaultResult``.
    """
    return global_wait_limit_seconds(heartbeat_timeout_seconds) - heartbeat_timeout_seconds


# --- the guard's own cadence ----------------------------------------------------------------------
RECONCILE_INTERVAL_SECONDS: Final = 60
"""The schedule's rate: the level-triggered reconcile, which also heartbeats long waits."""
TICKS_PER_HEARTBEAT_TIMEOUT: Final = 3
"""HeartbeatTimeout must span this many reconcile ticks, so that two missed ticks in a row (a
throttled or failed invocation, a late schedule) never let a busy instance's hook time out."""
MIN_HEARTBEAT_TIMEOUT_SECONDS: Final = RECONCILE_INTERVAL_SECONDS * TICKS_PER_HEARTBEAT_TIMEOUT

# --- defaults and ranges (seconds unless named otherwise) ----------------------------------------
DEFAULT_HOOK_NAME: Final = "busy-guard"
DEFAULT_TABLE_NAME: Final = "busy_guard.instance_busy"
DEFAULT_HEARTBEAT_TIMEOUT: Final = 900
DEFAULT_MAX_WAIT: Final = 12 * 3600
DEFAULT_CLOCK_SKEW: Final = 30
DEFAULT_LEGACY_STALE: Final = 6 * 3600
DEFAULT_RELEASED_TTL: Final = 7 * 24 * 3600
DEFAULT_TICK_CONCURRENCY: Final = 16
DEFAULT_RESERVED_CONCURRENCY: Final = 10
"""The guard Lambda's reserved concurrency: an account-wide throttle can't starve the heartbeats, and
a burst of lifecycle events can't take the account's whole pool. Ticks run one a minute and the
stream uses one invocation per shard, so a few are enough; a throttled async event waits in Lambda's
queue and is retried, never lost."""

MAX_WAIT_MIN: Final = 60
CLOCK_SKEW_RANGE: Final = (0, 300)
LEGACY_STALE_RANGE: Final = (60, 7 * 24 * 3600)
RELEASED_TTL_RANGE: Final = (3600, 365 * 24 * 3600)
TICK_CONCURRENCY_RANGE: Final = (1, 64)
TABLE_NAME_LENGTH: Final = (3, 255)
HOOK_NAME_LENGTH: Final = (1, 255)
GROUP_NAME_LENGTH: Final = (1, 255)
RESERVED_CONCURRENCY_RANGE: Final = (2, 100)
"""At least a tick and an event at once; at most what a guard could ever use without starving the
account's other functions."""

# --- AWS size limits the CDK app checks at synth --------------------------------------------------
EVENT_PATTERN_MAX_CHARS: Final = 2048
"""EventBridge's default quota for one rule's event pattern, in characters (adjustable to 4096 on
request; "Event pattern size" in the EventBridge quotas page)."""
LAMBDA_ENVIRONMENT_MAX_BYTES: Final = 4096
"""Lambda's limit on a function's environment: all keys and values together, 4 KB."""

INSTANCE_ID_PATTERN: Final = r"^i-(?:[0-9a-f]{8}|[0-9a-f]{17})$"
"""An EC2 instance id: ``i-`` and 8 hex digits (before 2016) or 17. The writer, the CLI and the guard's
event model check ids against it (``identity.validate_instance_id``)."""

# --- the writer's lease -------------------------------------------------------------------------
LEASE_TTL_SECONDS: Final = 180
LEASE_HEARTBEAT_SECONDS: Final = 60
MAX_KIND_LENGTH: Final = 256
"""Characters of a lease kind the writer stores. A kind is stored twice (in its lease and as
``last_destructive_op_kind``) and DynamoDB refuses an item over 400 KB, so an unbounded kind would
make a second lease fail and its work run unguarded; a longer kind is cut here (and logged)."""
WRITER_MAX_POOL_CONNECTIONS: Final = 64
"""Connections the writer's shared client may keep open to DynamoDB. botocore's default is 10,
fewer than the threads that call it at once in one process: asyncio's default executor alone runs
up to 32 begins and ends, beside any number of sync callers and heartbeat threads. Connections
open only when used, so a larger pool costs nothing in a quiet process."""

# --- logging ----------------------------------------------------------------------------------------
MAX_LOGGED_CHARS: Final = 64
"""Characters of any caller- or item-supplied string (a kind, an id, a value from an image) that
one log line shows: hostile input never makes a long log line."""


class Env:
    """Every environment variable busy-guard reads, and who reads it."""

    # the guard Lambda (and `busy-guard status`, which judges with the guard's settings)
    TABLE: Final = "BUSY_GUARD_TABLE"  # also the writer and the CLI
    ASG_NAMES: Final = "BUSY_GUARD_ASG_NAMES"  # also the CLI
    HOOK_NAME: Final = "BUSY_GUARD_HOOK_NAME"  # also the CLI
    HEARTBEAT_TIMEOUT: Final = "BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS"
    MAX_WAIT: Final = "BUSY_GUARD_MAX_WAIT_SECONDS"
    MAX_WAIT_RESULT: Final = "BUSY_GUARD_MAX_WAIT_RESULT"
    CLOCK_SKEW: Final = "BUSY_GUARD_CLOCK_SKEW_SECONDS"
    LEGACY_STALE: Final = "BUSY_GUARD_LEGACY_STALE_SECONDS"
    RECONCILE_INTERVAL: Final = "BUSY_GUARD_RECONCILE_INTERVAL_SECONDS"
    RELEASED_TTL: Final = "BUSY_GUARD_RELEASED_TTL_SECONDS"
    TICK_CONCURRENCY: Final = "BUSY_GUARD_TICK_CONCURRENCY"
    ACCOUNT_ID: Final = "BUSY_GUARD_ACCOUNT_ID"  # the stack's own account: events from others are ignored
    # the writer library (and `busy-guard run`)
    INSTANCE_ID: Final = "BUSY_GUARD_INSTANCE_ID"
    ENDPOINT_URL: Final = "BUSY_GUARD_ENDPOINT_URL"

    PREFIX: Final = "BUSY_GUARD_"
