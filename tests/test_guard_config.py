"""GuardConfig: validated once, and a bad variable is named in the error."""

from __future__ import annotations

import pytest

from busy_guard.decision import Action
from busy_guard.guard.config import ConfigError, GuardConfig

# What the stack gives every guard: its table and groups, and the account and region its instance ARNs
# are in (the isolated key scheme, the default).
BASE = {
    "BUSY_GUARD_TABLE": "busy_guard.instance_busy",
    "BUSY_GUARD_ASG_NAMES": "graph-db, loader ,",
    "BUSY_GUARD_ACCOUNT_ID": "123456789012",
    "AWS_REGION": "eu-west-1",
}


def test_defaults_follow_the_design() -> None:
    config = GuardConfig.from_env(BASE)
    assert config.asg_names == ("graph-db", "loader")
    assert (config.hook_name, config.heartbeat_timeout, config.max_wait) == ("busy-guard", 900, 12 * 3600)
    assert config.decision.max_wait_result is Action.CONTINUE
    assert (config.decision.clock_skew, config.decision.legacy_stale_after) == (30, 6 * 3600)
    # Items keyed by instance ARN, bare-id items still read: what a new stack deploys.
    assert (
        config.keys.key("i-0123456789abcdef0")
        == "arn:aws:ec2:eu-west-1:123456789012:instance/i-0123456789abcdef0"
    )
    assert config.keys.legacy_key("i-0123456789abcdef0") == "i-0123456789abcdef0"


def test_the_isolated_scheme_needs_the_account_and_region_of_its_arns() -> None:
    for missing in ("BUSY_GUARD_ACCOUNT_ID", "AWS_REGION"):
        with pytest.raises(ConfigError, match=missing):
            GuardConfig.from_env({k: v for k, v in BASE.items() if k != missing})
    legacy = GuardConfig.from_env(
        {"BUSY_GUARD_TABLE": "t.able", "BUSY_GUARD_ASG_NAMES": "g", "BUSY_GUARD_KEY_SCHEME": "legacy"}
    )
    assert legacy.keys.key("i-0123456789abcdef0") == "i-0123456789abcdef0"
    assert legacy.keys.legacy_key("i-0123456789abcdef0") is None


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"BUSY_GUARD_KEY_SCHEME": "per-host"}, "BUSY_GUARD_KEY_SCHEME"),
        ({"BUSY_GUARD_READ_LEGACY_KEYS": "perhaps"}, "BUSY_GUARD_READ_LEGACY_KEYS"),
        ({"BUSY_GUARD_PARTITION": "gcp"}, "BUSY_GUARD_PARTITION"),
        ({"AWS_REGION": "mars"}, "region"),
    ],
)
def test_bad_key_settings_are_named(overrides: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        GuardConfig.from_env({**BASE, **overrides})


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"BUSY_GUARD_TABLE": ""}, "BUSY_GUARD_TABLE"),
        ({"BUSY_GUARD_ASG_NAMES": " , "}, "BUSY_GUARD_ASG_NAMES"),
        ({"BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS": "9000"}, "BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS"),
        ({"BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS": "abc"}, "BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS"),
        ({"BUSY_GUARD_MAX_WAIT_RESULT": "DEFAULT"}, "BUSY_GUARD_MAX_WAIT_RESULT"),
        ({"BUSY_GUARD_MAX_WAIT_SECONDS": str(49 * 3600)}, "BUSY_GUARD_MAX_WAIT_SECONDS"),
        (
            {"BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS": "120", "BUSY_GUARD_MAX_WAIT_SECONDS": "3600"},
            "BUSY_GUARD_RECONCILE_INTERVAL_SECONDS",
        ),
        ({"BUSY_GUARD_RECONCILE_INTERVAL_SECONDS": "30"}, "BUSY_GUARD_RECONCILE_INTERVAL_SECONDS"),
    ],
)
def test_bad_variables_are_named(overrides: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        GuardConfig.from_env({**BASE, **overrides})


def test_missing_required_variables_are_named() -> None:
    with pytest.raises(ConfigError) as caught:
        GuardConfig.from_env({})
    assert "BUSY_GUARD_TABLE" in str(caught.value)
    assert "BUSY_GUARD_ASG_NAMES" in str(caught.value)


def test_max_wait_ceiling_follows_the_heartbeat_timeout() -> None:
    # 100 x 300 s = 30,000 s is the most AWS lets an instance wait with this hook; max_wait keeps one
    # HeartbeatTimeout of margin, so the guard's own result always comes first.
    fine = {**BASE, "BUSY_GUARD_HEARTBEAT_TIMEOUT_SECONDS": "300", "BUSY_GUARD_MAX_WAIT_SECONDS": "29700"}
    assert GuardConfig.from_env(fine).max_wait == 29700
    with pytest.raises(ConfigError, match="- HeartbeatTimeout = 29700s"):
        GuardConfig.from_env({**fine, "BUSY_GUARD_MAX_WAIT_SECONDS": "29701"})


def test_account_id_is_optional_under_the_legacy_scheme_and_must_be_an_account() -> None:
    legacy = {**BASE, "BUSY_GUARD_KEY_SCHEME": "legacy"}
    assert (
        GuardConfig.from_env({k: v for k, v in legacy.items() if k != "BUSY_GUARD_ACCOUNT_ID"}).account_id
        is None
    )
    assert GuardConfig.from_env(legacy).account_id == "123456789012"
    with pytest.raises(ConfigError, match="BUSY_GUARD_ACCOUNT_ID"):
        GuardConfig.from_env({**BASE, "BUSY_GUARD_ACCOUNT_ID": "12345"})
