"""Shared fixtures: fake AWS credentials, moto, the busy table, a controllable clock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, settings
from moto import mock_aws

from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.world import serialized_moto

# CI shares two cores with whatever else runs: judge properties, not the speed of data generation.
settings.register_profile("busy-guard", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("busy-guard")

REGION = "us-east-1"
BUSY_TABLE = "busy_guard.instance_busy"


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with fake credentials and a region, never a developer's profile, and without
    IMDS (so nothing waits on 169.254.169.254) or any BUSY_GUARD_* setting from the shell."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("BUSY_GUARD_INSTANCE_ID", "BUSY_GUARD_TABLE", "BUSY_GUARD_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def aws() -> Iterator[None]:
    """moto for every service, with requests served one at a time.

    Real DynamoDB serializes the writes to one item; moto's in-process backend does not and corrupts
    its own state when threads update one item at once. One lock around its request handler gives
    back DynamoDB's semantics without replacing any of moto's behaviour.
    """
    with serialized_moto(), mock_aws():
        yield


_sessions: list[boto3.session.Session] = []


def aws_session() -> boto3.session.Session:
    """One boto3 session for the whole run: a client from it takes milliseconds, where a fresh
    session (moto resets the default one on every start) spends ~0.2 s loading service models."""
    if not _sessions:
        _sessions.append(boto3.session.Session(region_name=REGION))
    return _sessions[0]


@pytest.fixture
def dynamodb(aws: None) -> Any:
    """A low-level DynamoDB client on moto (wire format, like the writer and the guard)."""
    return aws_session().client("dynamodb", region_name=REGION)


@pytest.fixture
def busy_table(dynamodb: Any) -> str:
    """The busy table on moto (key ``instance_id`` S); returns its name."""
    dynamodb.create_table(
        TableName=BUSY_TABLE,
        KeySchema=[{"AttributeName": "instance_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "instance_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return BUSY_TABLE


@pytest.fixture
def clock() -> ManualClock:
    """A wall clock that moves only when told to: ``clock()`` is epoch seconds, like ``time.time``."""
    return ManualClock(1_800_000_000.0)
