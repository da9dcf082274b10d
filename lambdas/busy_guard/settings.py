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
HEARTBEAT_FRACTION: Final = 3
"""A held instance is heartbeaten once a third of HeartbeatTimeout has passed since the last one:
Auto Scaling's API rate is account-wide, and every tick's heartbeat would spend N calls a minute."""


def heartbeat_every_seconds(heartbeat_timeout_seconds: float, reconcile_interval_seconds: float) -> float:
    """How long after the last heartbeat the next one is due: a third of the timeout, and soon
    enough that the ticks missed in a row that ``TICKS_PER_HEARTBEAT_TIMEOUT`` allows still can't
    let the hook time out."""
    slack = heartbeat_timeout_seconds - TICKS_PER_HEARTBEAT_TIMEOUT * reconcile_interval_seconds
    return max(0.0, min(heartbeat_timeout_seconds / HEARTBEAT_FRACTION, slack))


# --- the guard's own limits -----------------------------------------------------------------------
MAX_CLAIM_ROUNDS: Final = 3
"""Writers touching the item between the guard's read and its claim: re-decide this often at most."""
RECORDED_RELEASE_RETRY_AFTER_SECONDS: Final = 30
"""A recorded release this young is still being completed by the invocation that recorded it."""
MAX_TICK_WORK: Final = 1000
"""Instances one tick acts on at most; the rest wait for the next tick (metric TickWorkCapped)."""
MAX_PROVEN_LEASES: Final = 100
"""Leases a stale release can prove unchanged in one condition expression (4 KB): beyond, it waits."""
BATCH_GET_ATTEMPTS: Final = 5
BATCH_GET_BACKOFF_SECONDS: Final = (0.05, 1.0)
"""BatchGetItem's UnprocessedKeys are retried with full-jitter exponential backoff: base, cap."""

# --- AWS clients: the one retry layer (botocore's standard mode) ----------------------------------
AWS_CONNECT_TIMEOUT_SECONDS: Final = 3
AWS_READ_TIMEOUT_SECONDS: Final = 5
AWS_MAX_ATTEMPTS: Final = 3
"""Total attempts of one call, the first included (botocore ``total_max_attempts``)."""
AWS_RETRY_BACKOFF_CAP_SECONDS: Final = 20
"""botocore's standard mode: attempt n (n >= 1) sleeps random() x 2**(n-1), capped at 20 s."""


def aws_call_budget_seconds() -> float:
    """The longest one AWS call can take, retries and their backoff included."""
    attempts = AWS_MAX_ATTEMPTS * (AWS_CONNECT_TIMEOUT_SECONDS + AWS_READ_TIMEOUT_SECONDS)
    backoff = sum(min(AWS_RETRY_BACKOFF_CAP_SECONDS, 2**n) for n in range(AWS_MAX_ATTEMPTS - 1))
    return float(attempts + backoff)


FUNCTION_TIMEOUT_SECONDS: Final = 50
"""The guard Lambda's timeout: under the one-minute schedule, so ticks never pile up."""
DEADLINE_MARGIN_SECONDS: Final = 2
"""Kept back from the remaining time, for the handler's own logging and metrics."""
RULE_TARGET_MAX_EVENT_AGE_SECONDS: Final = 3600
"""The lifecycle rule's target retries delivering an event for at most an hour."""
ASYNC_MAX_EVENT_AGE_SECONDS: Final = 15 * 60
"""Lambda's async queue keeps a throttled invocation for at most 15 minutes."""
LIFECYCLE_EVENT_MAX_DELAY_SECONDS: Final = RULE_TARGET_MAX_EVENT_AGE_SECONDS + ASYNC_MAX_EVENT_AGE_SECONDS
"""The rule's target gives up on an event after 1 h, Lambda's async queue after 15 min more: an
event's ``time`` older than this is not believed as the start of the wait."""

# --- defaults and ranges (seconds unless named otherwise) ----------------------------------------
DEFAULT_HOOK_NAME: Final = "busy-guard"
DEFAULT_TABLE_NAME: Final = "busy_guard.instance_busy"
DEFAULT_HEARTBEAT_TIMEOUT: Final = 900
DEFAULT_HOOK_RESULT: Final = "CONTINUE"
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

# --- how items are keyed (issue: one instance can't touch another's work) -------------------------
KEY_SCHEME_ISOLATED: Final = "isolated"
"""Items keyed by the instance ARN, which IAM can name: the writers' policy lets each instance
update only the item keyed ``${ec2:SourceInstanceARN}`` (``dynamodb:LeadingKeys``)."""
KEY_SCHEME_LEGACY: Final = "legacy"
"""Items keyed by the bare instance id, as the replaced system wrote them: any writer can touch any
item. For an imported table until it is migrated."""
KEY_SCHEMES: Final = (KEY_SCHEME_ISOLATED, KEY_SCHEME_LEGACY)
DEFAULT_KEY_SCHEME: Final = KEY_SCHEME_ISOLATED
DEFAULT_READ_LEGACY_KEYS: Final = True
"""Under the isolated scheme, also read the item keyed by the bare id (the replaced system's, or a
legacy writer's) and count its work, until no such item can hold live work."""
DEFAULT_PARTITION: Final = "aws"
INSTANCE_ARN_PATTERN: Final = (
    r"^arn:(?P<partition>aws[a-z-]*):ec2:(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+):(?P<account>\d{12})"
    r":instance/(?P<instance_id>i-(?:[0-9a-f]{8}|[0-9a-f]{17}))$"
)
"""An EC2 instance ARN, ``arn:PARTITION:ec2:REGION:ACCOUNT:instance/ID``: what ``${ec2:SourceInstanceARN}``
resolves to for a request signed with an instance profile's credentials."""

# --- what the guard tells people (EventBridge) -----------------------------------------------------
EVENT_SOURCE: Final = "busy-guard"
EVENT_BUS: Final = "default"
EVENT_HELD: Final = "Instance held"
EVENT_RELEASED: Final = "Instance released"

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
    HOOK_DEFAULT_RESULT: Final = "BUSY_GUARD_HOOK_DEFAULT_RESULT"  # what the stack gave the hook
    MAX_WAIT: Final = "BUSY_GUARD_MAX_WAIT_SECONDS"
    MAX_WAIT_RESULT: Final = "BUSY_GUARD_MAX_WAIT_RESULT"
    CLOCK_SKEW: Final = "BUSY_GUARD_CLOCK_SKEW_SECONDS"
    LEGACY_STALE: Final = "BUSY_GUARD_LEGACY_STALE_SECONDS"
    RECONCILE_INTERVAL: Final = "BUSY_GUARD_RECONCILE_INTERVAL_SECONDS"
    RELEASED_TTL: Final = "BUSY_GUARD_RELEASED_TTL_SECONDS"
    TICK_CONCURRENCY: Final = "BUSY_GUARD_TICK_CONCURRENCY"
    ACCOUNT_ID: Final = "BUSY_GUARD_ACCOUNT_ID"  # the stack's own account: events from others are ignored
    OBSERVE_ONLY: Final = "BUSY_GUARD_OBSERVE_ONLY"  # decide and log, never hold ("true"/"false")
    KEY_SCHEME: Final = "BUSY_GUARD_KEY_SCHEME"  # "isolated" or "legacy"; also the CLI and the writer
    READ_LEGACY_KEYS: Final = "BUSY_GUARD_READ_LEGACY_KEYS"  # "true"/"false"; also the CLI
    PARTITION: Final = "BUSY_GUARD_PARTITION"  # the stack's partition, for instance ARNs; also the CLI
    # the writer library (and `busy-guard run`)
    INSTANCE_ID: Final = "BUSY_GUARD_INSTANCE_ID"
    INSTANCE_ARN: Final = "BUSY_GUARD_INSTANCE_ARN"  # the isolated scheme's key, where IMDS can't tell it
    ENDPOINT_URL: Final = "BUSY_GUARD_ENDPOINT_URL"

    # the sandbox and the tests: where DynamoDB Local's jar is, if not in node_modules
    DYNAMODB_LOCAL_DIR: Final = "BUSY_GUARD_DYNAMODB_LOCAL_DIR"

    PREFIX: Final = "BUSY_GUARD_"
