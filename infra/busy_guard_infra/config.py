"""The app's configuration: read once from CDK context (``cdk.json``, overridable with ``-c``), validated
once at synth, with messages that name the context key and its allowed range.

``GuardSettings`` is the part the guard construct needs; it validates itself, so a team that uses the
construct directly (with its own ``AutoScalingGroup`` objects) gets the same checks as the app.
``BusyGuardConfig`` is the whole app: settings plus groups, table, removal policy and alarm topic.

Values given with ``-c key=value`` reach the app as strings, so every parser accepts the string form
("900", "true", "a,b") as well as the JSON form that ``cdk.json`` holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from busy_guard import settings as S

HookResult = Literal["CONTINUE", "ABANDON"]
RemovalPolicyName = Literal["RETAIN", "DESTROY"]
KeyScheme = Literal["isolated", "legacy"]

_T = TypeVar("_T")

HOOK_RESULTS: Final = ("CONTINUE", "ABANDON")
REMOVAL_POLICIES: Final = ("RETAIN", "DESTROY")

# Every limit is defined once, in busy_guard.settings, which the guard Lambda validates with too.
HEARTBEAT_TIMEOUT_RANGE: Final = S.HEARTBEAT_TIMEOUT_RANGE
MAX_HEARTBEATS: Final = S.MAX_HEARTBEATS
MAX_INSTANCE_WAIT_SECONDS: Final = S.MAX_INSTANCE_WAIT_SECONDS
RECONCILE_INTERVAL_SECONDS: Final = S.RECONCILE_INTERVAL_SECONDS
TICKS_PER_HEARTBEAT_TIMEOUT: Final = S.TICKS_PER_HEARTBEAT_TIMEOUT
MIN_HEARTBEAT_TIMEOUT_SECONDS: Final = S.MIN_HEARTBEAT_TIMEOUT_SECONDS
MIN_MAX_WAIT_SECONDS: Final = S.MAX_WAIT_MIN
CLOCK_SKEW_RANGE: Final = S.CLOCK_SKEW_RANGE
LEGACY_STALE_RANGE: Final = S.LEGACY_STALE_RANGE
RELEASED_TTL_RANGE: Final = S.RELEASED_TTL_RANGE
RESERVED_CONCURRENCY_RANGE: Final = S.RESERVED_CONCURRENCY_RANGE

_HOOK_NAME = re.compile(r"[A-Za-z0-9\-_/]{1,255}")
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.\-]{3,255}")
_STACK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9\-]{0,127}")
_SNS_TOPIC_ARN = re.compile(r"arn:aws[a-z\-]*:sns:[a-z0-9\-]+:\d{12}:[A-Za-z0-9_\-]{1,256}(\.fifo)?")
_STREAM_ARN = re.compile(r"arn:aws[a-z\-]*:dynamodb:[a-z0-9\-]+:\d{12}:table/(?P<table>[^/]+)/stream/.+")


class ContextKey:
    """The context keys, camelCase, as they appear in ``cdk.json`` and after ``-c``."""

    STACK_NAME: Final = "stackName"
    ASG_NAMES: Final = "asgNames"
    HOOK_NAME: Final = "hookName"
    HEARTBEAT_TIMEOUT: Final = "heartbeatTimeoutSeconds"
    DEFAULT_RESULT: Final = "defaultResult"
    MAX_WAIT: Final = "maxWaitSeconds"
    MAX_WAIT_RESULT: Final = "maxWaitResult"
    CLOCK_SKEW: Final = "clockSkewSeconds"
    LEGACY_STALE: Final = "legacyStaleSeconds"
    RELEASED_TTL: Final = "releasedTtlSeconds"
    OBSERVE_ONLY: Final = "observeOnly"
    TABLE_NAME: Final = "tableName"
    IMPORT_TABLE: Final = "importTable"
    TABLE_STREAM_ARN: Final = "tableStreamArn"
    REMOVAL_POLICY: Final = "removalPolicy"
    ALARM_TOPIC_ARN: Final = "alarmTopicArn"
    RESERVED_CONCURRENCY: Final = "reservedConcurrency"
    KEY_SCHEME: Final = "keyScheme"
    READ_LEGACY_KEYS: Final = "readLegacyKeys"


K = ContextKey

BY_TABLE: Final = ""
"""``keyScheme`` and ``readLegacyKeys`` unset (cdk.json's value): each takes the default that fits the
table. A created table is new, so ``isolated`` with ``readLegacyKeys`` false (no bare-id item can
exist in it); an imported table holds the replaced system's bare-id items
until it is migrated, so ``legacy``. A value in cdk.json itself would override that choice for both."""

DEFAULTS: Final[dict[str, Any]] = {
    K.STACK_NAME: "BusyGuard",
    K.HOOK_NAME: S.DEFAULT_HOOK_NAME,
    K.HEARTBEAT_TIMEOUT: S.DEFAULT_HEARTBEAT_TIMEOUT,
    K.DEFAULT_RESULT: "CONTINUE",
    K.MAX_WAIT: S.DEFAULT_MAX_WAIT,
    K.MAX_WAIT_RESULT: "CONTINUE",
    K.CLOCK_SKEW: S.DEFAULT_CLOCK_SKEW,
    K.LEGACY_STALE: S.DEFAULT_LEGACY_STALE,
    K.RELEASED_TTL: S.DEFAULT_RELEASED_TTL,
    K.OBSERVE_ONLY: False,
    K.TABLE_NAME: S.DEFAULT_TABLE_NAME,
    K.IMPORT_TABLE: False,
    K.TABLE_STREAM_ARN: "",
    K.REMOVAL_POLICY: "RETAIN",
    K.ALARM_TOPIC_ARN: "",
    K.RESERVED_CONCURRENCY: S.DEFAULT_RESERVED_CONCURRENCY,
    K.KEY_SCHEME: BY_TABLE,
    K.READ_LEGACY_KEYS: BY_TABLE,
}
"""Every key's default except ``asgNames``, which has none: the app refuses to guard nothing.
``keyScheme`` and ``readLegacyKeys`` default by table (``BY_TABLE``)."""


def default_key_scheme(*, import_table: bool) -> KeyScheme:
    """``legacy`` for an imported table (the replaced system's bare-id items), else ``isolated``."""
    return S.KEY_SCHEME_LEGACY if import_table else S.DEFAULT_KEY_SCHEME


class ConfigError(ValueError):
    """One or more configuration problems; each names its context key and the allowed values."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid busy-guard configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


max_wait_limit_seconds = S.max_wait_limit_seconds


def _in_range(key: str, value: int, low: int, high: int, *, why: str = "") -> list[str]:
    if low <= value <= high:
        return []
    reason = f" ({why})" if why else ""
    return [f"{key} must be between {low} and {high} s{reason}; got {value}"]


@dataclass(frozen=True, kw_only=True)
class GuardSettings:
    """What the lifecycle hook and the guard Lambda are configured with. Validated on creation."""

    hook_name: str = DEFAULTS[K.HOOK_NAME]
    heartbeat_timeout_seconds: int = DEFAULTS[K.HEARTBEAT_TIMEOUT]
    default_result: HookResult = DEFAULTS[K.DEFAULT_RESULT]
    max_wait_seconds: int = DEFAULTS[K.MAX_WAIT]
    max_wait_result: HookResult = DEFAULTS[K.MAX_WAIT_RESULT]
    clock_skew_seconds: int = DEFAULTS[K.CLOCK_SKEW]
    legacy_stale_seconds: int = DEFAULTS[K.LEGACY_STALE]
    released_ttl_seconds: int = DEFAULTS[K.RELEASED_TTL]
    reserved_concurrency: int = DEFAULTS[K.RESERVED_CONCURRENCY]
    observe_only: bool = DEFAULTS[K.OBSERVE_ONLY]
    """Trial mode: the guard decides, logs and counts, and completes every termination at once."""
    key_scheme: KeyScheme = S.DEFAULT_KEY_SCHEME
    """How items are keyed: ``isolated`` (the instance ARN; each writer can update only its own item) or
    ``legacy`` (the bare instance id, as the replaced system wrote them; any writer can touch any item).
    The construct can't tell an imported table from a new one: pass ``legacy`` for a table that still
    holds the replaced system's items."""
    read_legacy_keys: bool | None = None
    """Under ``isolated``, also count the work of the bare-id item of each instance (a legacy writer's)
    until none can hold live work. None: ``settings.DEFAULT_READ_LEGACY_KEYS`` under ``isolated``, and
    off under ``legacy``, where there is no other key to read (True there is refused)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    @property
    def reads_legacy_keys(self) -> bool:
        """Whether the guard also reads the bare-id companion items: ``read_legacy_keys`` resolved."""
        if self.key_scheme != S.KEY_SCHEME_ISOLATED:
            return False
        return S.DEFAULT_READ_LEGACY_KEYS if self.read_legacy_keys is None else self.read_legacy_keys

    def problems(self) -> list[str]:
        problems: list[str] = []
        if self.key_scheme not in S.KEY_SCHEMES:
            problems.append(
                f"{K.KEY_SCHEME} must be one of {', '.join(S.KEY_SCHEMES)}; got {self.key_scheme!r}"
            )
        elif self.key_scheme == S.KEY_SCHEME_LEGACY and self.read_legacy_keys:
            problems.append(
                f"{K.READ_LEGACY_KEYS} can't be true with {K.KEY_SCHEME}={S.KEY_SCHEME_LEGACY}: legacy items "
                f"are keyed by the bare instance id already, so there is no other key to read. It is the "
                f"migration step for {K.KEY_SCHEME}={S.KEY_SCHEME_ISOLATED}; remove it or set it to false"
            )
        if not _HOOK_NAME.fullmatch(self.hook_name):
            problems.append(
                f"{K.HOOK_NAME} must be 1 to 255 characters of A-Z a-z 0-9 - _ / "
                f"(a lifecycle hook name); got {self.hook_name!r}"
            )
        timeout = self.heartbeat_timeout_seconds
        low, high = HEARTBEAT_TIMEOUT_RANGE
        if not low <= timeout <= high:
            problems += _in_range(K.HEARTBEAT_TIMEOUT, timeout, low, high, why="a lifecycle hook's range")
        elif timeout < MIN_HEARTBEAT_TIMEOUT_SECONDS:
            problems.append(
                f"{K.HEARTBEAT_TIMEOUT} must be between {MIN_HEARTBEAT_TIMEOUT_SECONDS} and {high} s: the "
                f"{RECONCILE_INTERVAL_SECONDS} s reconcile heartbeats the hook, and HeartbeatTimeout must "
                f"span at least {TICKS_PER_HEARTBEAT_TIMEOUT} ticks so that two missed ticks never let a "
                f"busy instance's hook time out; got {timeout}"
            )
        else:
            limit = max_wait_limit_seconds(timeout)
            problems += _in_range(
                K.MAX_WAIT,
                self.max_wait_seconds,
                MIN_MAX_WAIT_SECONDS,
                limit,
                why=(
                    f"no longer than min({MAX_HEARTBEATS} x {K.HEARTBEAT_TIMEOUT}, 48 h) - "
                    f"{K.HEARTBEAT_TIMEOUT} = {limit} s: the longest Auto Scaling lets an instance wait, "
                    "less one heartbeat of margin so that maxWaitResult always acts before AWS's timeout"
                ),
            )
        for key, result in (
            (K.DEFAULT_RESULT, self.default_result),
            (K.MAX_WAIT_RESULT, self.max_wait_result),
        ):
            if result not in HOOK_RESULTS:
                problems.append(f"{key} must be one of {', '.join(HOOK_RESULTS)}; got {result!r}")
        problems += _in_range(K.CLOCK_SKEW, self.clock_skew_seconds, *CLOCK_SKEW_RANGE)
        problems += _in_range(K.LEGACY_STALE, self.legacy_stale_seconds, *LEGACY_STALE_RANGE)
        problems += _in_range(K.RELEASED_TTL, self.released_ttl_seconds, *RELEASED_TTL_RANGE)
        low, high = RESERVED_CONCURRENCY_RANGE
        if not low <= self.reserved_concurrency <= high:
            problems.append(
                f"{K.RESERVED_CONCURRENCY} must be between {low} and {high} (concurrent guard invocations: "
                f"a tick and an event at least); got {self.reserved_concurrency}"
            )
        return problems


def group_name_problems(names: Sequence[str]) -> list[str]:
    """The guarded Auto Scaling group names: at least one, each a valid name the guard can pass on."""
    if not names:
        return [f"{K.ASG_NAMES} must name at least one Auto Scaling group to guard; got none"]
    problems: list[str] = []
    for name in names:
        if not 1 <= len(name) <= 255 or name != name.strip():
            problems.append(
                f"{K.ASG_NAMES}: each name must be 1 to 255 characters without surrounding spaces; "
                f"got {name!r}"
            )
        elif "," in name:
            # The Lambda receives the names comma-separated (BUSY_GUARD_ASG_NAMES).
            problems.append(f"{K.ASG_NAMES}: a name must not contain a comma; got {name!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"{K.ASG_NAMES}: each group must be named once; repeated: {', '.join(duplicates)}")
    return problems


@dataclass(frozen=True, kw_only=True)
class BusyGuardConfig:
    """The whole app's configuration."""

    asg_names: tuple[str, ...]
    settings: GuardSettings = field(default_factory=GuardSettings)
    stack_name: str = DEFAULTS[K.STACK_NAME]
    table_name: str = DEFAULTS[K.TABLE_NAME]
    import_table: bool = DEFAULTS[K.IMPORT_TABLE]
    table_stream_arn: str | None = None
    removal_policy: RemovalPolicyName = DEFAULTS[K.REMOVAL_POLICY]
    alarm_topic_arn: str | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        problems = group_name_problems(self.asg_names)
        if not _STACK_NAME.fullmatch(self.stack_name):
            problems.append(
                f"{K.STACK_NAME} must start with a letter and be up to 128 characters of A-Z a-z 0-9 -; "
                f"got {self.stack_name!r}"
            )
        if not _TABLE_NAME.fullmatch(self.table_name):
            problems.append(
                f"{K.TABLE_NAME} must be 3 to 255 characters of A-Z a-z 0-9 _ . -; got {self.table_name!r}"
            )
        if self.import_table:
            match = _STREAM_ARN.fullmatch(self.table_stream_arn or "")
            if match is None:
                problems.append(
                    f"{K.TABLE_STREAM_ARN} is required when {K.IMPORT_TABLE} is true: the stream ARN of the "
                    "existing table (arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL), which synth "
                    f"cannot look up; got {self.table_stream_arn or 'nothing'!r}"
                )
            elif match["table"] != self.table_name:
                problems.append(
                    f"{K.TABLE_STREAM_ARN} must be the stream of {K.TABLE_NAME} {self.table_name!r}; "
                    f"it belongs to table {match['table']!r}"
                )
        elif self.table_stream_arn:
            problems.append(f"{K.TABLE_STREAM_ARN} is only used with {K.IMPORT_TABLE}=true; remove it")
        if self.removal_policy not in REMOVAL_POLICIES:
            problems.append(
                f"{K.REMOVAL_POLICY} must be one of {', '.join(REMOVAL_POLICIES)}; "
                f"got {self.removal_policy!r}"
            )
        if self.alarm_topic_arn is not None and not _SNS_TOPIC_ARN.fullmatch(self.alarm_topic_arn):
            problems.append(
                f"{K.ALARM_TOPIC_ARN} must be an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME) or empty; "
                f"got {self.alarm_topic_arn!r}"
            )
        return problems

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> BusyGuardConfig:
        """Read every key with ``get`` (``node.try_get_context``); a missing key takes its default.

        All problems are reported at once: values of the wrong type (not a number, not a boolean, ...)
        and then the ranges and cross-key rules of everything else.
        """
        reader = _Reader(get)
        names = reader.names(K.ASG_NAMES)
        import_table = reader.flag(K.IMPORT_TABLE)
        settings_values = {
            "hook_name": reader.text(K.HOOK_NAME),
            "heartbeat_timeout_seconds": reader.seconds(K.HEARTBEAT_TIMEOUT),
            "default_result": reader.choice(K.DEFAULT_RESULT, HOOK_RESULTS),
            "max_wait_seconds": reader.seconds(K.MAX_WAIT),
            "max_wait_result": reader.choice(K.MAX_WAIT_RESULT, HOOK_RESULTS),
            "clock_skew_seconds": reader.seconds(K.CLOCK_SKEW),
            "legacy_stale_seconds": reader.seconds(K.LEGACY_STALE),
            "released_ttl_seconds": reader.seconds(K.RELEASED_TTL),
            "reserved_concurrency": reader.whole(K.RESERVED_CONCURRENCY),
            "observe_only": reader.flag(K.OBSERVE_ONLY),
            "key_scheme": reader.unless_by_table(K.KEY_SCHEME, reader.scheme)
            or default_key_scheme(import_table=import_table),
            # A table the stack creates can't hold the replaced system's bare-id items (the writers'
            # policy refuses bare ids): nothing to read, so no transaction per release.
            "read_legacy_keys": read_legacy
            if (read_legacy := reader.unless_by_table(K.READ_LEGACY_KEYS, reader.flag)) is not None
            else (None if import_table else False),
        }
        app_values = {
            "stack_name": reader.text(K.STACK_NAME),
            "table_name": reader.text(K.TABLE_NAME),
            "import_table": import_table,
            "table_stream_arn": reader.text(K.TABLE_STREAM_ARN) or None,
            "removal_policy": reader.choice(K.REMOVAL_POLICY, REMOVAL_POLICIES),
            "alarm_topic_arn": reader.text(K.ALARM_TOPIC_ARN) or None,
        }
        # A value of the wrong type was replaced by its default, so the checks below still run on
        # everything else and every problem is reported in one go.
        problems = list(reader.problems)
        settings: GuardSettings | None = None
        try:
            settings = GuardSettings(**settings_values)
        except ConfigError as error:
            problems += error.problems
        try:
            config = cls(asg_names=names, settings=settings or GuardSettings(), **app_values)
        except ConfigError as error:
            problems += error.problems
        if problems:
            raise ConfigError(problems)
        return config


class _Reader:
    """Reads and types context values, collecting a problem per bad key instead of stopping."""

    def __init__(self, get: Callable[[str], Any]) -> None:
        self._get = get
        self.problems: list[str] = []

    def _raw(self, key: str) -> Any:
        value = self._get(key)
        return DEFAULTS.get(key) if value is None else value

    def text(self, key: str) -> str:
        value = self._raw(key)
        if not isinstance(value, str):
            self.problems.append(f"{key} must be a string; got {value!r}")
            return str(DEFAULTS.get(key, ""))
        return value.strip()

    def seconds(self, key: str) -> int:
        return self.whole(key, unit=" of seconds")

    def whole(self, key: str, *, unit: str = "") -> int:
        value = self._raw(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        self.problems.append(f"{key} must be a whole number{unit}; got {value!r}")
        return int(DEFAULTS[key])

    def flag(self, key: str) -> bool:
        value = self._raw(key)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
            return value.strip().lower() == "true"
        self.problems.append(f"{key} must be true or false; got {value!r}")
        return bool(DEFAULTS[key])

    def choice(self, key: str, allowed: Sequence[str]) -> Any:
        value = self._raw(key)
        if isinstance(value, str) and value.strip().upper() in allowed:
            return value.strip().upper()
        self.problems.append(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
        return DEFAULTS[key]

    def scheme(self, key: str) -> str:
        """A key scheme: lower case, unlike ``choice``'s upper-case names. A bad value is kept, so that
        ``GuardSettings`` names it with the allowed values."""
        value = self._raw(key)
        if isinstance(value, str):
            return value.strip().lower()
        self.problems.append(f"{key} must be one of {', '.join(S.KEY_SCHEMES)}; got {value!r}")
        return S.DEFAULT_KEY_SCHEME

    def unless_by_table(self, key: str, read: Callable[[str], _T]) -> _T | None:
        """None when ``key`` is unset (missing, or ``BY_TABLE`` as cdk.json has it), else ``read(key)``."""
        value = self._raw(key)
        if value is None or (isinstance(value, str) and value.strip() == BY_TABLE):
            return None
        return read(key)

    def names(self, key: str) -> tuple[str, ...]:
        """A JSON list (``cdk.json``), or a string: a JSON list or comma-separated names (``-c``)."""
        value = self._get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    self.problems.append(f"{key} is not a valid JSON list: {text!r}")
                    return ()
            else:
                return tuple(part.strip() for part in text.split(",") if part.strip())
        if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return tuple(value)
        self.problems.append(
            f"{key} must be a list of Auto Scaling group names (or a comma-separated string); got {value!r}"
        )
        return ()
