"""The guard's configuration: environment variables, validated once into one frozen model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from busy_guard.decision import Action, DecisionConfig

# AWS limits on a lifecycle hook (DESIGN.md, "AWS facts").
MIN_HEARTBEAT_TIMEOUT = 30
MAX_HEARTBEAT_TIMEOUT = 7200
MAX_GLOBAL_WAIT = 48 * 3600
HEARTBEAT_TIMEOUT_MULTIPLIER = 100
# The reconcile tick must fit this many times into HeartbeatTimeout, so two lost ticks in a row
# still leave a heartbeat in time.
TICKS_PER_HEARTBEAT_TIMEOUT = 3


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


class GuardConfig(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    table_name: str = Field(alias="BUSY_GUARD_TABLE", min_length=3, max_length=255)
    asg_names: tuple[str, ...] = Field(alias="BUSY_GUARD_ASG_NAMES", min_length=1)
    hook_name: str = Field("busy-guard", alias="BUSY_GUARD_HOOK_NAME", min_length=1, max_length=255)
    heartbeat_timeout: int = Field(
        900, alias="BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS", ge=MIN_HEARTBEAT_TIMEOUT, le=MAX_HEARTBEAT_TIMEOUT
    )
    max_wait: float = Field(12 * 3600, alias="BUSY_GUARD_MAX_WAIT_SECONDS", gt=0)
    max_wait_result: Literal["CONTINUE", "ABANDON"] = Field("CONTINUE", alias="BUSY_GUARD_MAX_WAIT_RESULT")
    clock_skew: float = Field(30, alias="BUSY_GUARD_CLOCK_SKEW_SECONDS", ge=0, le=600)
    legacy_stale_after: float = Field(6 * 3600, alias="BUSY_GUARD_LEGACY_STALE_SECONDS", gt=0)
    reconcile_interval: float = Field(60, alias="BUSY_GUARD_RECONCILE_INTERVAL_SECONDS", ge=60)
    released_ttl: float = Field(7 * 24 * 3600, alias="BUSY_GUARD_RELEASED_TTL_SECONDS", ge=3600)
    tick_concurrency: int = Field(16, alias="BUSY_GUARD_TICK_CONCURRENCY", ge=1, le=64)

    @field_validator("asg_names", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @model_validator(mode="after")
    def _check_timing(self) -> GuardConfig:
        ceiling = min(HEARTBEAT_TIMEOUT_MULTIPLIER * self.heartbeat_timeout, MAX_GLOBAL_WAIT)
        if self.max_wait > ceiling:
            raise ValueError(
                f"BUSY_GUARD_MAX_WAIT_SECONDS={self.max_wait:.0f} is longer than AWS lets an instance "
                f"wait: min(100 x HeartbeatTimeout, 48 h) = {ceiling}s"
            )
        if self.reconcile_interval * TICKS_PER_HEARTBEAT_TIMEOUT > self.heartbeat_timeout:
            raise ValueError(
                f"BUSY_GUARD_RECONCILE_INTERVAL_SECONDS={self.reconcile_interval:.0f} cannot keep the hook "
                f"alive: BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS={self.heartbeat_timeout} must be at least "
                f"{TICKS_PER_HEARTBEAT_TIMEOUT} x the reconcile interval"
            )
        return self

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
            return cls.model_validate({k: v for k, v in source.items() if k.startswith("BUSY_GUARD_")})
        except ValidationError as error:
            raise ConfigError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "configuration"
        got = f" (got {problem['input']!r})" if where != "configuration" and "input" in problem else ""
        lines.append(f"{where}: {problem['msg']}{got}")
    return "invalid guard configuration: " + "; ".join(lines)
