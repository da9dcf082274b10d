"""Who this process is: the instance id (validated from every source), IMDS's endpoint, boot time.

IMDS is a fake on loopback (IPv4, and IPv6 for the IPv6 endpoint mode); the writer runs against moto.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.credentials
import botocore.session
import pytest

from busy_guard import begin_destructive_op, identity, instance_busy_sync, writer

IMDS_ID = "i-0feedfacecafe0001"
LOGGER = "busy_guard.writer"


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    # Nothing of the developer's AWS config may choose the IMDS endpoint or its mode.
    config = tmp_path / "aws-config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for name in (
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
        "AWS_IMDS_USE_IPV6",
    ):
        monkeypatch.delenv(name, raising=False)
    writer.reset_caches()
    identity.reset_caches()
    yield
    writer.reset_caches()
    identity.reset_caches()


class _Imds(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []  # noqa: RUF012 - reset per test
    instance_id = IMDS_ID

    def do_PUT(self) -> None:
        self.requests.append("PUT " + self.path)
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._answer(200 if ok else 400, b"TOKEN")

    def do_GET(self) -> None:
        self.requests.append("GET " + self.path)
        document = {"accountId": "210987654321", "region": "eu-west-3", "instanceId": self.instance_id}
        answers = {
            "/latest/meta-data/instance-id": self.instance_id.encode(),
            "/latest/meta-data/placement/region": b"eu-west-3",
            "/latest/meta-data/services/partition": b"aws",
            "/latest/dynamic/instance-identity/document": json.dumps(document).encode(),
        }
        ok = self.path in answers and self.headers.get("X-aws-ec2-metadata-token") == "TOKEN"
        self._answer(200 if ok else 401, answers.get(self.path, b""))

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _Imds6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _serve(server: http.server.ThreadingHTTPServer) -> Callable[[], None]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


@pytest.fixture
def imds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A fake IMDS on 127.0.0.1, named by AWS_EC2_METADATA_SERVICE_ENDPOINT; yields its request log."""
    _Imds.requests = []
    _Imds.instance_id = IMDS_ID
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    stop = _serve(server)
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}/")
    try:
        yield _Imds.requests
    finally:
        stop()


@pytest.fixture
def imds_ipv6(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A fake IMDS on [::1] standing in for [fd00:ec2::254]: the IPv6 mode's address is pointed at it,
    no custom endpoint is set, so only the endpoint mode can send a request there."""
    _Imds.requests = []
    _Imds.instance_id = IMDS_ID
    server = _Imds6Server(("::1", 0), _Imds)
    stop = _serve(server)
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setitem(identity.IMDS_ENDPOINTS, "ipv6", f"http://[::1]:{server.server_address[1]}/")
    try:
        yield _Imds.requests
    finally:
        stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- the instance id and its sources ----------------------------------------------------------------
def test_instance_id_precedence(monkeypatch: pytest.MonkeyPatch, imds: list[str]) -> None:
    assert identity.resolve_instance_id("i-0123456789abcdef0") == "i-0123456789abcdef0"
    assert identity.resolve_instance_id(" i-0123abcd ") == "i-0123abcd"  # the 8-digit form, trimmed
    assert identity.resolve_instance_id("") == ""  # explicit empty: no lookup
    monkeypatch.setenv("BUSY_GUARD_INSTANCE_ID", "i-00000000000000e11")
    assert identity.resolve_instance_id() == "i-00000000000000e11"
    assert imds == []
    monkeypatch.delenv("BUSY_GUARD_INSTANCE_ID")
    assert identity.resolve_instance_id() == IMDS_ID
    assert identity.resolve_instance_id() == IMDS_ID
    assert imds == ["PUT /latest/api/token", "GET /latest/meta-data/instance-id"]  # cached


@pytest.mark.parametrize(
    "value",
    [
        "i-0123456789abcdef",  # 16 digits
        "i-0123456",  # 7
        "i-012345678",  # 9: neither form
        "i-0123456789ABCDEF0",  # EC2 ids are lowercase
        "i-0123456789abcdef0\n",  # a trailing newline (an env file, an echo)
        "0123456789abcdef0",
        "ip-10-0-0-1.ec2.internal",  # a hostname
        "arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0",
        "i-" + "a" * 10_000,
    ],
)
def test_validate_instance_id_rejects_what_is_not_an_id_and_names_the_source(value: str) -> None:
    with pytest.raises(identity.InvalidInstanceIdError) as raised:
        identity.validate_instance_id(value, "SOMEWHERE")
    message = str(raised.value)
    assert message.startswith("SOMEWHERE: not an EC2 instance id")
    assert len(message) < 200  # a 10 kB value is cut, not echoed
    assert isinstance(raised.value, ValueError)


def test_an_invalid_explicit_id_raises_before_any_write(dynamodb: Any, busy_table: str) -> None:
    calls: list[str] = []
    dynamodb.meta.events.register("before-call.dynamodb.*", lambda model, **_: calls.append(model.name))
    ran = False
    with (
        pytest.raises(ValueError, match="instance_id argument: not an EC2 instance id"),
        instance_busy_sync("my-host", "k", table=busy_table, client=dynamodb),
    ):
        ran = True
    with pytest.raises(ValueError, match="instance_id argument"):
        asyncio.run(begin_destructive_op("i-XYZ", "k", table=busy_table, client=dynamodb))
    assert not ran
    assert calls == []


def test_an_invalid_id_in_the_environment_is_an_error_and_the_body_runs_without_a_lease(
    dynamodb: Any, busy_table: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    dynamodb.meta.events.register("before-call.dynamodb.*", lambda model, **_: calls.append(model.name))
    monkeypatch.setenv("BUSY_GUARD_INSTANCE_ID", "web-1")
    ran = 0
    for _ in range(2):
        with instance_busy_sync(None, "nightly", table=busy_table, client=dynamodb) as lease:
            assert lease is None
            ran += 1
    assert ran == 2
    assert calls == []
    errors = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert errors == [
        "busy_guard: BUSY_GUARD_INSTANCE_ID: not an EC2 instance id (like "
        "i-0123456789abcdef0): 'web-1'; nightly runs without a lease"
    ]  # once


def test_a_malformed_imds_answer_counts_as_no_answer(
    dynamodb: Any, busy_table: str, imds: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    _Imds.instance_id = "<html>captive portal</html>"
    calls: list[str] = []
    dynamodb.meta.events.register("before-call.dynamodb.*", lambda model, **_: calls.append(model.name))
    with instance_busy_sync(None, "k", table=busy_table, client=dynamodb) as lease:
        assert lease is None
    assert calls == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "busy_guard.identity"]
    assert any("IMDS meta-data/instance-id: not an EC2 instance id" in w for w in warnings), warnings


def test_imds_is_used_by_the_writer(dynamodb: Any, busy_table: str, imds: list[str]) -> None:
    with instance_busy_sync(None, "k", table=busy_table, client=dynamodb) as lease:
        assert lease is not None and lease.instance_id == IMDS_ID


def test_the_isolated_scheme_leases_on_the_arn_imds_names(
    dynamodb: Any, busy_table: str, imds: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On EC2 the writer needs nothing but the table: its item's key (the ARN IAM compares with
    ``${ec2:SourceInstanceARN}``) is built from the identity document and the partition, once."""
    monkeypatch.setenv("BUSY_GUARD_KEY_SCHEME", "isolated")
    expected = f"arn:aws:ec2:eu-west-3:210987654321:instance/{IMDS_ID}"
    for _ in range(2):
        with instance_busy_sync(None, "k", table=busy_table, client=dynamodb) as lease:
            assert lease is not None and (lease.instance_id, lease.key) == (IMDS_ID, expected)
            item = dynamodb.get_item(TableName=busy_table, Key={"instance_id": {"S": expected}})["Item"]
            assert lease.lease_id in item["leases"]["M"]
    assert imds.count("GET /latest/dynamic/instance-identity/document") == 1  # cached
    assert "GET /latest/meta-data/services/partition" in imds


def test_region_comes_from_imds_when_nothing_else_sets_it(
    monkeypatch: pytest.MonkeyPatch, imds: list[str]
) -> None:
    # boto3 never asks IMDS for the region: without this, an instance with no AWS_REGION and no
    # config file would run every operation unprotected (NoRegionError).
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    client = writer._shared_client(None)
    assert client.meta.region_name == "eu-west-3"
    assert imds == ["PUT /latest/api/token", "GET /latest/meta-data/placement/region"]


def test_imds_unreachable_is_quick_and_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert identity.resolve_instance_id() == ""
    assert time.monotonic() - started < 1.5
    calls: list[int] = []
    monkeypatch.setattr(identity, "_fetch_instance_id", lambda: calls.append(1) or IMDS_ID)
    assert identity.resolve_instance_id() == ""
    assert calls == []  # the failure is cached for a while
    monkeypatch.setattr(identity, "IMDS_FAILURE_TTL", 0.0)
    assert identity.resolve_instance_id() == IMDS_ID


def test_imds_disabled_makes_no_request(imds: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert identity.resolve_instance_id() == ""
    assert imds == []


# --- the IMDS endpoint, chosen as botocore chooses it ---------------------------------------------------
def _botocore_imds_url() -> str:
    """Where botocore's own credential chain would ask IMDS for the instance role's credentials."""
    resolver = botocore.credentials.create_credential_resolver(botocore.session.Session())
    provider = resolver.get_provider("iam-role")
    url: str = provider._role_fetcher.get_base_url()
    return url


@pytest.mark.parametrize(
    ("environment", "config", "expected"),
    [
        ({}, "", "http://169.254.169.254/"),
        ({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}, "", "http://[fd00:ec2::254]/"),
        ({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "ipv4"}, "", "http://169.254.169.254/"),
        ({}, "ec2_metadata_service_endpoint_mode = IPv6", "http://[fd00:ec2::254]/"),
        ({"AWS_IMDS_USE_IPV6": "true"}, "", "http://[fd00:ec2::254]/"),
        # the mode beats imds_use_ipv6, and the environment beats the config file
        (
            {"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv4", "AWS_IMDS_USE_IPV6": "true"},
            "",
            "http://169.254.169.254/",
        ),
        (
            {"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv4"},
            "ec2_metadata_service_endpoint_mode = IPv6",
            "http://169.254.169.254/",
        ),
        # a custom endpoint wins over the mode
        (
            {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://[::1]:8111/"},
            "ec2_metadata_service_endpoint_mode = IPv6",
            "http://[::1]:8111/",
        ),
        ({}, "ec2_metadata_service_endpoint = http://127.0.0.1:8111/", "http://127.0.0.1:8111/"),
    ],
)
def test_imds_endpoint_is_the_one_botocore_uses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, environment: dict[str, str], config: str, expected: str
) -> None:
    config_file = tmp_path / "config"
    config_file.write_text(f"[default]\n{config}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert identity.imds_endpoint() == expected
    assert _botocore_imds_url() == expected


def test_an_unknown_endpoint_mode_is_an_imds_failure_not_a_crash(
    dynamodb: Any, busy_table: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "ipv5")
    with instance_busy_sync(None, "k", table=busy_table, client=dynamodb) as lease:
        assert lease is None
    assert any("ipv5" in r.getMessage() for r in caplog.records if r.name == "busy_guard.identity")


def test_the_ipv6_endpoint_mode_sends_imds_requests_to_the_ipv6_address(
    dynamodb: Any, busy_table: str, monkeypatch: pytest.MonkeyPatch, imds_ipv6: list[str]
) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
    with instance_busy_sync(None, "k", table=busy_table, client=dynamodb) as lease:
        assert lease is not None and lease.instance_id == IMDS_ID
    assert imds_ipv6 == ["PUT /latest/api/token", "GET /latest/meta-data/instance-id"]


def test_without_the_ipv6_mode_the_ipv6_address_is_not_asked(
    monkeypatch: pytest.MonkeyPatch, imds_ipv6: list[str]
) -> None:
    monkeypatch.setitem(identity.IMDS_ENDPOINTS, "ipv4", f"http://127.0.0.1:{free_port()}/")  # refuses
    assert identity.resolve_instance_id() == ""
    assert imds_ipv6 == []


# --- boot time ------------------------------------------------------------------------------------------
def test_boot_time_is_in_the_past_and_cached() -> None:
    boot = identity.boot_time()
    assert 0 < boot < time.time()
    assert identity.boot_time() == boot


def test_boot_time_unreadable_is_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError("/proc/uptime")

    monkeypatch.setattr("builtins.open", no_proc)
    assert identity._read_boot_time() == 0.0
