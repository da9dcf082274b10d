"""The guard's configuration: environment variables, validated once into one frozen model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from busy_guard import settings as S
from busy_guard.decision import Action, DecisionConfig
from busy_guard.keys import LEGACY, InstanceKeys
from busy_guard.settings import Env

REGION_ENV = "AWS_REGION"


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


class GuardConfig(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    table_name: str = Field(
        alias=Env.TABLE, min_length=S.TABLE_NAME_LENGTH[0], max_length=S.TABLE_NAME_LENGTH[1]
    )
    asg_names: tuple[str, ...] = Field(alias=Env.ASG_NAMES, min_length=1)
    hook_name: str = Field(
        S.DEFAULT_HOOK_NAME,
        alias=Env.HOOK_NAME,
        min_length=S.HOOK_NAME_LENGTH[0],
        max_length=S.HOOK_NAME_LENGTH[1],
    )
    heartbeat_timeout: int = Field(
        S.DEFAULT_HEARTBEAT_TIMEOUT,
        alias=Env.HEARTBEAT_TIMEOUT,
        ge=S.HEARTBEAT_TIMEOUT_RANGE[0],
        le=S.HEARTBEAT_TIMEOUT_RANGE[1],
    )
    hook_default_result: Literal["CONTINUE", "ABANDON"] = Field(
        S.DEFAULT_HOOK_RESULT, alias=Env.HOOK_DEFAULT_RESULT
    )
    max_wait: float = Field(S.DEFAULT_MAX_WAIT, alias=Env.MAX_WAIT, ge=S.MAX_WAIT_MIN)
    max_wait_result: Literal["CONTINUE", "ABANDON"] = Field("CONTINUE", alias=Env.MAX_WAIT_RESULT)
    clock_skew: float = Field(
        S.DEFAULT_CLOCK_SKEW, alias=Env.CLOCK_SKEW, ge=S.CLOCK_SKEW_RANGE[0], le=S.CLOCK_SKEW_RANGE[1]
    )
    legacy_stale_after: float = Field(
        S.DEFAULT_LEGACY_STALE,
        alias=Env.LEGACY_STALE,
        ge=S.LEGACY_STALE_RANGE[0],
        le=S.LEGACY_STALE_RANGE[1],
    )
    reconcile_interval: float = Field(
        S.RECONCILE_INTERVAL_SECONDS, alias=Env.RECONCILE_INTERVAL, ge=S.RECONCILE_INTERVAL_SECONDS
    )
    released_ttl: float = Field(
        S.DEFAULT_RELEASED_TTL,
        alias=Env.RELEASED_TTL,
        ge=S.RELEASED_TTL_RANGE[0],
        le=S.RELEASED_TTL_RANGE[1],
    )
    tick_concurrency: int = Field(
        S.DEFAULT_TICK_CONCURRENCY,
        alias=Env.TICK_CONCURRENCY,
        ge=S.TICK_CONCURRENCY_RANGE[0],
        le=S.TICK_CONCURRENCY_RANGE[1],
    )

    account_id: str | None = Field(None, alias=Env.ACCOUNT_ID, pattern=r"^\d{12}$")
    """The stack's own account; lifecycle events from any other account are ignored. Unset in the
    sandbox and in tests that build the guard by hand."""
    observe_only: bool = Field(False, alias=Env.OBSERVE_ONLY)
    """Decide, log and count what the guard would do, but complete every termination at once."""
    key_scheme: Literal["isolated", "legacy"] = Field(S.DEFAULT_KEY_SCHEME, alias=Env.KEY_SCHEME)
    """How items are keyed (``busy_guard.keys``): by instance ARN, or by the bare id."""
    read_legacy_keys: bool = Field(S.DEFAULT_READ_LEGACY_KEYS, alias=Env.READ_LEGACY_KEYS)
    """Isolated only: also count the work on bare-id items (the replaced system's, legacy writers')."""
    partition: str = Field(S.DEFAULT_PARTITION, alias=Env.PARTITION, pattern=r"^aws[a-z-]*$")
    region: str | None = Field(None, alias=REGION_ENV)
    """The guard's own region (Lambda sets ``AWS_REGION``): the region of its groups' instance ARNs."""

    @field_validator("asg_names", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @model_validator(mode="after")
    def _check_timing(self) -> GuardConfig:
        ceiling = S.max_wait_limit_seconds(self.heartbeat_timeout)
        if self.max_wait > ceiling:
            raise ValueError(
                f"{Env.MAX_WAIT}={self.max_wait:.0f} leaves no margin before AWS's own timeout: "
                f"min(100 x HeartbeatTimeout, 48 h) - HeartbeatTimeout = {ceiling}s"
            )
        if self.reconcile_interval * S.TICKS_PER_HEARTBEAT_TIMEOUT > self.heartbeat_timeout:
            raise ValueError(
                f"{Env.RECONCILE_INTERVAL}={self.reconcile_interval:.0f} cannot keep the hook "
                f"alive: {Env.HEARTBEAT_TIMEOUT}={self.heartbeat_timeout} must be at least "
                f"{S.TICKS_PER_HEARTBEAT_TIMEOUT} x the reconcile interval"
            )
        return self

    @model_validator(mode="after")
    def _check_keys(self) -> GuardConfig:
        if self.key_scheme == S.KEY_SCHEME_ISOLATED and (self.account_id is None or not self.region):
            raise ValueError(
                f"{Env.KEY_SCHEME}={S.KEY_SCHEME_ISOLATED} keys items by instance ARN, which needs "
                f"{Env.ACCOUNT_ID} and {REGION_ENV}"
            )
        self.keys  # noqa: B018 - builds (and so validates) the ARN prefix once, here
        return self

    @property
    def keys(self) -> InstanceKeys:
        if self.key_scheme == S.KEY_SCHEME_LEGACY:
            return LEGACY
        assert self.account_id is not None and self.region is not None
        return InstanceKeys.isolated_keys(
            account=self.account_id,
            region=self.region,
            partition=self.partition,
            read_legacy=self.read_legacy_keys,
        )

    @property
    def decision(self) -> DecisionConfig:
        return DecisionConfig(
            max_wait=self.max_wait,
            max_wait_result=Action(self.max_wait_result),
            clock_skew=self.clock_skew,
            legacy_stale_after=self.legacy_stale_after,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GuardConfig:
        source = os.environ if env is None else env
        try:
            wanted = {k: v for k, v in source.items() if k.startswith(Env.PREFIX) or k == REGION_ENV}
            return cls.model_validate(wanted)
        except ValidationError as error:
            raise ConfigError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "configuration"
        got = f" (got {problem['input']!r})" if where != "configuration" and "input" in problem else ""
        lines.append(f"{where}: {problem['msg']}{got}")
    return "invalid guard configuration: " + "; ".join(lines)
