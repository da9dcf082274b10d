"""The ``busy-guard`` CLI as a user runs it.

Most tests start the real command (``python -m busy_guard.cli``) in a subprocess against a
``moto_server`` on 127.0.0.1, with fake credentials, and look at what a user sees: stdout, stderr,
the exit code, and the table afterwards. ``release`` of an *active* lifecycle action needs the
hook emulator, which lives behind botocore's event hooks in this process, so those tests call
``main([...])`` in-process inside a ``Sandbox`` and hand the CLI a session whose autoscaling
clients carry the emulator.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import io
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from busy_guard import schema
from busy_guard.cli import main
from busy_guard.guard.table import BusyTable
from busy_guard.sandbox import LifecycleHookEmulator, ManualClock
from busy_guard.sandbox.world import MOTO_EXAMPLE_AMI, Sandbox
from busy_guard.schema import Draining, Lease

REGION = "us-east-1"
TABLE = "busy_guard.instance_busy"
GROUP = "graph-db"
HOOK = "busy-guard"
MOTO_SERVER = Path(sys.executable).with_name("moto_server")
GONE_ID = "i-0000000000000dead"
CLI = [sys.executable, "-m", "busy_guard.cli"]


# --- moto_server and the world in it -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    errors = process.stderr.read().decode() if process.stderr else ""
                    pytest.fail(f"moto_server did not start (needs flask and flask-cors):\n{errors[-2000:]}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: fake credentials, a region, no profile files, no IMDS, no BUSY_GUARD_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BUSY_GUARD_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION=REGION,
        AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/nonexistent/config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
        COLUMNS="120",
        # The world's items are written by hand with bare ids (tests/test_isolation.py: ARNs).
        BUSY_GUARD_KEY_SCHEME="legacy",
    )
    env.update(extra)
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        check=False,
        env=env or user_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The stderr of a failed command: exactly one line, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


class World:
    """The table and a group with our hook, on moto_server, seen through the test's own clients."""

    def __init__(self, endpoint: str, *, instances: int = 3) -> None:
        # Module-scoped, so set up before the autouse environment fixture: credentials of its own.
        session = boto3.Session(
            region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        self.endpoint = endpoint
        self.dynamodb: Any = session.client("dynamodb", endpoint_url=endpoint)
        self.autoscaling: Any = session.client("autoscaling", endpoint_url=endpoint)
        ec2: Any = session.client("ec2", endpoint_url=endpoint)
        self.dynamodb.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": schema.INSTANCE_ID, "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": schema.INSTANCE_ID, "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        # moto's example AMI: describing moto's image catalogue costs seconds.
        ec2.create_launch_template(
            LaunchTemplateName="cli-test",
            LaunchTemplateData={"ImageId": MOTO_EXAMPLE_AMI, "InstanceType": "t3.micro"},
        )
        self.autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=GROUP,
            LaunchTemplate={"LaunchTemplateName": "cli-test", "Version": "$Latest"},
            MinSize=0,
            MaxSize=6,
            DesiredCapacity=instances,
            AvailabilityZones=[f"{REGION}a"],
        )
        self.autoscaling.put_lifecycle_hook(
            AutoScalingGroupName=GROUP,
            LifecycleHookName=HOOK,
            LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
            HeartbeatTimeout=900,
            DefaultResult="CONTINUE",
        )
        self.table = BusyTable(self.dynamodb, TABLE)

    def instances(self) -> list[str]:
        groups = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])
        return sorted(i["InstanceId"] for i in groups["AutoScalingGroups"][0]["Instances"])

    def item(self, instance_id: str) -> schema.BusyState:
        return self.table.get(instance_id)


def put_lease(client: Any, instance_id: str, kind: str, holder: str, *, started: float, ttl: float) -> Lease:
    """A lease as the writer records it (the schema's own update), started at a chosen time."""
    lease = Lease(uuid.uuid4().hex, kind, holder, started, started, started + ttl)
    has_map = schema.LEASES in client.get_item(TableName=TABLE, Key=schema.key(instance_id)).get("Item", {})
    client.update_item(
        TableName=TABLE,
        Key=schema.key(instance_id),
        **schema.begin_update(lease, boot_time=0, create_map=not has_map),
    )
    return lease


@pytest.fixture(scope="module")
def world(moto_server: str) -> World:
    """One world for the module: tests that write use instance ids of their own (``new_instance``);
    the status tests only read ``busy_world``."""
    return World(moto_server)


def new_instance() -> str:
    return f"i-{uuid.uuid4().hex[:17]}"


def aws_args(world: World) -> list[str]:
    return ["--endpoint-url", world.endpoint]


# --- help and bad arguments -------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["status"], ["release"], ["run"], ["demo"]])
def test_help_has_examples_and_exit_codes(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "exit codes:" in out
    assert "75" in out and "nothing to release" in out


def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("busy-guard")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, env=user_env(), check=False
    )
    assert result.returncode == 0 and "usage: busy-guard" in result.stdout and "exit codes:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["release"], "the following arguments are required: INSTANCE_ID"),
        (["release", "not-an-instance", "--yes"], "not an EC2 instance id"),
        (["run", "--on-draining", "maybe", "--", "true"], "invalid choice: 'maybe'"),
        (["run", "--instance-id", "i-xyz", "--", "true"], "not an EC2 instance id"),
        (["run", "--"], "no command to run"),
        (["demo", "--speed", "0"], "must be positive"),
        (["status", "--endpoint-url", "localhost:5000"], "not an http(s) URL with a host"),
        (["drain", "i-0123456789abcdef0", "--max-wait", "soon"], "not a duration"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_bad_arguments_as_a_user_sees_them() -> None:
    result = cli("status", "--bogus")
    assert result.returncode == 2
    assert (
        one_line_error(result)
        == "busy-guard: error: unrecognized arguments: --bogus (see 'busy-guard --help')"
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"busy-guard {importlib.metadata.version('busy-guard')}"


class HtmlPage(http.server.BaseHTTPRequestHandler):
    """What a proxy or a wrong --endpoint-url answers: an HTML page, not AWS."""

    def do_POST(self) -> None:
        body = b'<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"><title>502 Bad Gateway</title>\n</html>'
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.parametrize("status", [200, 502])
def test_an_html_answer_is_one_line(capsys: pytest.CaptureFixture[str], status: int) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HtmlPage)
    server.status = status  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code = main(["status", "--asg", GROUP, "--endpoint-url", url])
    finally:
        server.shutdown()
    line = only_line(capsys.readouterr().err)
    assert code == 1
    assert line.startswith("busy-guard status: ")
    assert "an HTML page (502 Bad Gateway)" in line and "<" not in line


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "status" in err and "release" in err and "exit codes:" in err


def test_cli_never_imports_moto() -> None:
    code = "import sys, busy_guard.cli; sys.exit(int(any(m.split('.')[0] == 'moto' for m in sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], env=user_env(), check=False).returncode == 0


# --- status ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def busy_world(world: World) -> dict[str, str]:
    """busy: a live lease; stale: only an expired lease; idle: nothing; gone: a draining item whose
    instance left the group."""
    busy, stale, idle = world.instances()
    now = time.time()
    put_lease(world.dynamodb, busy, "bulk_table_insert", "worker-1:4242", started=now - 300, ttl=3600)
    put_lease(world.dynamodb, stale, "materialization", "worker-2:77", started=now - 7200, ttl=180)
    world.table.mark_draining(GONE_ID, Draining(since=now - 600, asg=GROUP, hook=HOOK))
    return {"busy": busy, "stale": stale, "idle": idle, "gone": GONE_ID}


def test_status_table_shows_leases_draining_and_decision(world: World, busy_world: dict[str, str]) -> None:
    result = cli("status", "--asg", GROUP, *aws_args(world))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = {
        name: next(line for line in out.splitlines() if line.startswith(iid))
        for name, iid in busy_world.items()
    }
    assert out.splitlines()[0].startswith(f"group {GROUP} | table {TABLE} | hook {HOOK} | {REGION} | ")
    assert "INSTANCE" in out and "LIFECYCLE" in out and "GUARD WOULD" in out
    assert "InService" in lines["busy"] and "WAIT (busy)" in lines["busy"]
    assert "lease bulk_table_insert (worker-1:4242): age 5m0" in out and "expires in 5" in out
    assert "CONTINUE (stale)" in lines["stale"]
    assert "lease materialization (worker-2:77): age 2h00m, EXPIRED 1h5" in out
    assert "CONTINUE (idle)" in lines["idle"]
    assert "not in group" in lines["gone"] and "for 10m0" in lines["gone"]
    assert "no longer in the group" in out
    assert out.rstrip().endswith(
        "4 instance(s), 1 busy, 0 in Terminating:Wait, 1 draining, 1 gone from the group"
    )


def test_status_json_shape(world: World, busy_world: dict[str, str]) -> None:
    env = user_env(BUSY_GUARD_ASG_NAMES=GROUP)  # the group from the guard's own variable
    result = cli("status", "--json", *aws_args(world), env=env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {
        *("version", "generated_at", "region", "table", "hook", "groups", "instances"),
        *("observe_only", "refreshes"),  # version 2
    }
    # moto_server has no instance refreshes: unknown, said once (test_observe_and_events has them).
    assert document["refreshes"] is None and document["observe_only"] is False
    assert "warning: instance refreshes unknown: " in result.stderr
    assert document["version"] == 2 and document["groups"] == [GROUP] and document["table"] == TABLE
    assert document["generated_at"].endswith("Z")
    rows = {row["instance_id"]: row for row in document["instances"]}
    assert set(rows) == set(busy_world.values()) and list(rows)[-1] == GONE_ID  # the group's, then gone
    for row in rows.values():
        assert set(row) == {
            "instance_id",
            "group",
            "lifecycle_state",
            "in_group",
            "leases",
            "legacy",
            "draining",
            "released",
            "maintenance",
            "last_maintenance",
            "guard_would",
            "problems",
        }
    busy = rows[busy_world["busy"]]
    assert busy["group"] == GROUP and busy["lifecycle_state"] == "InService" and busy["in_group"] is True
    assert busy["guard_would"]["action"] == "WAIT" and busy["guard_would"]["reason"] == "busy"
    (lease,) = busy["leases"]
    assert set(lease) == {
        "lease_id",
        "kind",
        "holder",
        "live",
        "started_at",
        "heartbeat_at",
        "expires_at",
        "age_seconds",
        "expires_in_seconds",
    }
    assert (
        lease["kind"] == "bulk_table_insert" and lease["holder"] == "worker-1:4242" and lease["live"] is True
    )
    assert isinstance(lease["age_seconds"], int) and 295 <= lease["age_seconds"] <= 330
    assert 3270 <= lease["expires_in_seconds"] <= 3305
    assert lease["started_at"].endswith("Z") and "T" in lease["started_at"]
    assert busy["legacy"] == {
        "counter": 1,
        "untracked_ops": 0,
        "last_op_at": busy["legacy"]["last_op_at"],
        "last_op_kind": "bulk_table_insert",
        "active_leases": [],
    }
    stale = rows[busy_world["stale"]]
    assert stale["leases"][0]["live"] is False and stale["leases"][0]["expires_in_seconds"] < -3000
    assert stale["guard_would"] == {
        "action": "CONTINUE",
        "reason": "stale",
        "detail": "1 expired or stale marker(s)",
    }
    idle = rows[busy_world["idle"]]
    assert idle["leases"] == [] and idle["draining"] is None and idle["released"] is None
    gone = rows[GONE_ID]
    assert gone["in_group"] is False and gone["lifecycle_state"] is None and gone["group"] == GROUP
    assert gone["draining"]["asg"] == GROUP and gone["draining"]["hook"] == HOOK
    assert 595 <= gone["draining"]["waiting_seconds"] <= 640


def test_status_without_a_group_lists_the_table(world: World, busy_world: dict[str, str]) -> None:
    result = cli("status", *aws_args(world))
    assert result.returncode == 0
    assert "listing the table only" in result.stderr
    assert busy_world["busy"] in result.stdout and GONE_ID in result.stdout
    assert busy_world["idle"] not in result.stdout  # no item, nothing to show


def test_status_unknown_group(world: World) -> None:
    result = cli("status", "--asg", f"{GROUP},nope", *aws_args(world))
    assert result.returncode == 2
    assert one_line_error(result) == f"busy-guard status: Auto Scaling group not found in {REGION}: nope"


def test_missing_credentials(world: World) -> None:
    env = user_env()
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    result = cli("status", "--asg", GROUP, *aws_args(world), env=env)
    assert result.returncode == 2
    assert "no AWS credentials found" in one_line_error(result)


# The same checks through the CLI runner (main() in this process): quicker than a process each.
def run_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def only_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    return line


def test_status_decision_follows_the_guards_settings(
    world: World,
    busy_world: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The gone item has waited 10 minutes: past a 5-minute max_wait the guard gives up waiting.
    monkeypatch.setenv("BUSY_GUARD_MAX_WAIT_SECONDS", "300")
    monkeypatch.setenv("BUSY_GUARD_MAX_WAIT_RESULT", "ABANDON")
    code, out, _ = run_here(capsys, "status", "--asg", GROUP, "--json", *aws_args(world))
    assert code == 0
    rows = {row["instance_id"]: row for row in json.loads(out)["instances"]}
    assert rows[GONE_ID]["guard_would"]["action"] == "ABANDON"
    assert rows[GONE_ID]["guard_would"]["reason"] == "max_wait_exceeded"

    monkeypatch.setenv("BUSY_GUARD_MAX_WAIT_RESULT", "MAYBE")
    code, _, err = run_here(capsys, "status", "--asg", GROUP, *aws_args(world))
    assert code == 2
    assert only_line(err).startswith(
        "busy-guard status: invalid guard configuration: BUSY_GUARD_MAX_WAIT_RESULT"
    )


def test_status_missing_table(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_here(capsys, "status", "--asg", GROUP, "--table", "no_such_table", *aws_args(world))
    assert code == 2
    assert only_line(err) == f"busy-guard status: table 'no_such_table' not found in {REGION}"


def test_missing_region(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    code, _, err = run_here(capsys, "status", "--asg", GROUP, *aws_args(world))
    assert code == 2
    assert only_line(err) == "busy-guard status: no AWS region: pass --region or set AWS_REGION"
    assert run_here(capsys, "status", "--asg", GROUP, "--region", REGION, *aws_args(world))[0] == 0


def test_unknown_profile(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    code, _, err = run_here(capsys, "status", "--asg", GROUP, "--profile", "nobody")
    assert code == 2
    assert only_line(err) == "busy-guard status: AWS profile 'nobody' not found"


def test_unreachable_endpoint_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    code, _, err = run_here(capsys, "status", "--asg", GROUP, "--endpoint-url", dead)
    assert code == 1
    assert only_line(err).startswith(
        f'busy-guard status: cannot reach AWS: Could not connect to the endpoint URL: "{dead}/'
    )


# --- run -------------------------------------------------------------------------------------------------
READ_LEASES = """
import os, sys, boto3
client = boto3.client("dynamodb", endpoint_url=os.environ["ENDPOINT"], region_name=os.environ["AWS_REGION"])
item = client.get_item(TableName=sys.argv[1], Key={"instance_id": {"S": sys.argv[2]}})["Item"]
lease = next(iter(item["leases"]["M"].values()))["M"]
print("leases", len(item["leases"]["M"]), lease["kind"]["S"])
sys.exit(3)
"""

TRAP = """
import pathlib, signal, sys, time
marker, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def stop(signum, frame):
    marker.write_text(str(signum))
    sys.exit(7 if signum == signal.SIGTERM else 9)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
ready.write_text("ready")
time.sleep(30)
sys.exit(1)
"""


def run_args(world: World, instance: str, *extra: str) -> list[str]:
    return ["run", "--instance-id", instance, *aws_args(world), *extra]


def test_run_holds_a_lease_and_exits_with_the_childs_status(world: World) -> None:
    instance = new_instance()
    env = user_env(ENDPOINT=world.endpoint)
    command = ["--", sys.executable, "-c", READ_LEASES, TABLE, instance]
    result = cli(*run_args(world, instance, "--kind", "backfill", *command), env=env)
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "leases 1 backfill"
    assert result.stderr == ""
    state = world.item(instance)
    assert state.leases == () and state.counter == 0 and state.last_op_kind == "backfill"


def test_run_takes_the_instance_from_the_environment(world: World) -> None:
    instance = new_instance()
    env = user_env(BUSY_GUARD_INSTANCE_ID=instance, ENDPOINT=world.endpoint)
    command = ["--", sys.executable, "-c", READ_LEASES, TABLE, instance]
    result = cli("run", *aws_args(world), "--kind", "cron", *command, env=env)
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "leases 1 cron"


def test_run_checks_the_environments_instance_id_like_the_option(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    env = user_env(BUSY_GUARD_INSTANCE_ID="web-01.example")
    result = cli("run", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ok')", env=env)
    assert result.returncode == 2
    assert one_line_error(result) == (
        "busy-guard run: $BUSY_GUARD_INSTANCE_ID: not an EC2 instance id (like i-0123456789abcdef0): "
        "'web-01.example' (or pass --instance-id)"
    )
    assert not marker.exists()


def test_run_with_only_aws_region_set_takes_a_lease(world: World) -> None:
    """The library reads AWS_REGION (botocore reads only AWS_DEFAULT_REGION): so does `run`."""
    instance = new_instance()
    env = user_env(ENDPOINT=world.endpoint)
    del env["AWS_DEFAULT_REGION"]
    command = ["--", sys.executable, "-c", READ_LEASES, TABLE, instance]
    result = cli(*run_args(world, instance, "--kind", "backfill", *command), env=env)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (3, "leases 1 backfill", "")


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 7), (signal.SIGINT, 9)])
def test_run_forwards_signals_to_the_child(world: World, tmp_path: Path, signum: int, status: int) -> None:
    instance = new_instance()
    marker, ready = tmp_path / "marker", tmp_path / "ready"
    process = subprocess.Popen(
        [*CLI, *run_args(world, instance, "--", sys.executable, "-c", TRAP, str(marker), str(ready))],
        env=user_env(),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    (lease,) = world.item(instance).leases
    assert lease.kind == Path(sys.executable).name  # without --kind: the command's name
    process.send_signal(signum)
    assert process.wait(15) == status
    assert marker.read_text() == str(signum)
    assert world.item(instance).leases == ()  # the lease ended with the command
    assert process.stderr is not None and process.stderr.read() == ""


COUNT_SIGINTS = """
import pathlib, signal, sys, time
count, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
received = []
signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
ready.write_text("ready")
time.sleep(1.5)
count.write_text(str(len(received)))
sys.exit(5)
"""


def test_run_at_a_terminal_lets_ctrl_c_reach_the_child_once(world: World, tmp_path: Path) -> None:
    """Ctrl-C at a terminal signals the whole foreground process group, the child included: the CLI
    must not send it a second SIGINT."""
    count, ready = tmp_path / "count", tmp_path / "ready"
    argv = [
        *CLI,
        *run_args(world, new_instance(), "--", sys.executable, "-c", COUNT_SIGINTS, str(count), str(ready)),
    ]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the CLI, in the foreground of a new terminal
        os.execve(sys.executable, argv, user_env())
    output = b""
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline, output
            if select.select([terminal], [], [], 0.05)[0]:
                output += os.read(terminal, 4096)
        os.write(terminal, b"\x03")  # Ctrl-C
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the terminal's last process has exited
                break
            if not chunk:
                break
            output += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 5, output
    assert count.read_text() == "1"


def test_run_reports_a_child_killed_by_a_signal_as_128_plus_n(world: World) -> None:
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    result = cli(*run_args(world, new_instance(), "--", sys.executable, "-c", kill))
    assert result.returncode == 128 + signal.SIGKILL


def test_run_never_fails_the_command_when_the_table_is_unreachable(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    dead = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    result = cli(
        "run", "--instance-id", new_instance(), "--endpoint-url", dead, "--", sys.executable, "-c",
        f"open({str(marker)!r}, 'w').write('ok')",
    )  # fmt: skip
    assert result.returncode == 0
    assert marker.read_text() == "ok"
    assert "runs without a lease" in result.stderr and "Traceback" not in result.stderr
    # The library's warning carries the CLI's one prefix, like the CLI's own warnings.
    assert result.stderr.startswith("busy-guard run: warning: begin of python")
    assert time.monotonic() - started < 15


def test_run_refuses_while_draining(world: World, tmp_path: Path) -> None:
    instance = new_instance()
    # Another group's instance, so the status tests of this module never list it.
    world.table.mark_draining(instance, Draining(since=time.time() - 60, asg="other", hook=HOOK))
    marker = tmp_path / "ran"
    command = ["--", sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ok')"]
    result = cli(*run_args(world, instance, *command))
    assert result.returncode == 75
    line = one_line_error(result)
    assert f"instance {instance} is draining since" in line and "--on-draining warn" in line
    assert not marker.exists()

    result = cli(*run_args(world, instance, "--on-draining", "warn", *command))
    assert result.returncode == 0 and marker.exists()
    assert "on_draining='warn'" in result.stderr
    assert world.item(instance).leases == ()


def test_run_command_not_found_or_not_executable(world: World, tmp_path: Path) -> None:
    instance = new_instance()
    result = cli(*run_args(world, instance, "--", "no-such-command-anywhere"))
    assert result.returncode == 127
    assert one_line_error(result) == "busy-guard run: command not found: no-such-command-anywhere"
    assert world.item(instance).leases == ()  # begun, then ended

    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")  # not chmod +x
    result = cli(*run_args(world, instance, "--", str(script)))
    assert result.returncode == 126
    assert one_line_error(result).startswith("busy-guard run: cannot execute")


# --- release: refusals that never reach AWS ----------------------------------------------------------
def test_release_without_a_terminal_or_yes_refuses(world: World) -> None:
    busy = world.instances()[0]
    result = cli("release", busy, "--asg", GROUP, *aws_args(world))
    assert result.returncode == 2
    assert "refusing to release without confirmation" in one_line_error(result)
    assert world.item(busy).released is None


def test_release_unknown_group(world: World) -> None:
    result = cli("release", world.instances()[0], "--asg", "nope", "--yes", *aws_args(world))
    assert result.returncode == 2
    assert one_line_error(result) == f"busy-guard release: Auto Scaling group not found in {REGION}: nope"


# --- release of a real pending action: in-process, with the lifecycle-hook emulator --------------------
class EmulatedSession(boto3.Session):
    """A session whose autoscaling clients answer through the lifecycle-hook emulator (the
    lifecycle-action calls and instance refreshes moto lacks)."""

    def __init__(self, emulator: LifecycleHookEmulator) -> None:
        super().__init__(region_name=REGION)
        self._emulator = emulator

    def client(self, service_name: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        client = super().client(service_name, *args, **kwargs)
        if service_name == "autoscaling":
            self._emulator.attach(client)
        return client


@dataclass
class Local:
    """The sandbox, and the CLI run in-process against it with one session for all its calls."""

    sandbox: Sandbox
    session: EmulatedSession
    clock: ManualClock

    def main(self, *args: str) -> int:
        return main(list(args), session=self.session, clock=self.clock)

    def waiting_busy_instance(self) -> str:
        """An instance with a live lease (started 2 minutes ago) that has been in Terminating:Wait,
        marked draining by the real guard, for 4 minutes."""
        busy = self.sandbox.instances(GROUP)[0]
        now = self.clock()
        put_lease(
            self.sandbox.dynamodb, busy, "bulk_table_insert", "worker-1:4242", started=now - 120, ttl=3600
        )
        self.sandbox.terminate(busy)
        assert self.sandbox.emulator.state(busy) == "Terminating:Wait" and self.sandbox.item(busy).is_draining
        self.clock.advance(240)
        return busy


@pytest.fixture
def local(monkeypatch: pytest.MonkeyPatch) -> Iterator[Local]:
    for name in [name for name in os.environ if name.startswith("BUSY_GUARD_")]:
        monkeypatch.delenv(name)
    # Whole seconds, like the lifecycle event's time that starts the guard's wait.
    clock = ManualClock(float(int(time.time()) - 3600))
    with Sandbox.start(clock=clock) as sandbox:
        yield Local(sandbox, EmulatedSession(sandbox.emulator), clock)


def test_release_completes_the_hook_and_records_who_and_why(
    local: Local, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = local.sandbox
    busy = local.waiting_busy_instance()
    code = local.main("release", busy, "--asg", GROUP, "--reason", "disk full, INC-42", "--yes")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"released {busy}: completed lifecycle hook 'busy-guard' of group {GROUP} with CONTINUE" in out
    (completion,) = sandbox.emulator.completions(busy)
    assert completion.result == "CONTINUE" and completion.hook_name == HOOK
    assert busy not in sandbox.instances(GROUP)
    state = sandbox.item(busy)
    assert state.draining is None and state.released is not None
    assert state.released.reason == "operator: disk full, INC-42"
    assert state.released.by.startswith("arn:aws:sts::123456789012:")  # the caller's identity
    assert state.released.at == local.clock()
    assert state.expires_at is not None and state.expires_at > local.clock()
    # The work's own lease is left alone (it expires on its own): a legacy writer's, on the bare-id
    # item beside the ARN item the guard and the release mark (this sandbox runs the isolated scheme).
    assert len(sandbox.item_at(busy).leases) == 1 and state.leases == ()
    assert f"released.reason 'operator: disk full, INC-42', released.by '{state.released.by}'" in out

    # status then shows who released it (table only: the instance has left the group).
    monkeypatch.delenv("BUSY_GUARD_ASG_NAMES")  # set by the sandbox
    assert local.main("status") == 0
    out = capsys.readouterr().out
    assert "released 0s ago: operator: disk full, INC-42 (by arn:aws:sts::123456789012:" in out


def test_release_finds_the_group_itself(local: Local) -> None:
    busy = local.waiting_busy_instance()
    assert local.main("release", busy, "--yes") == 0
    assert local.sandbox.emulator.completions(busy)[0].result == "CONTINUE"
    released = local.sandbox.item(busy).released
    assert released is not None and released.reason == "operator"


def test_release_with_nothing_to_release_changes_nothing(
    local: Local, capsys: pytest.CaptureFixture[str]
) -> None:
    idle = local.sandbox.instances(GROUP)[1]
    code = local.main("release", idle, "--asg", GROUP, "--yes")
    out, err = capsys.readouterr()
    assert code == 3
    assert out == ""
    assert err.strip() == (
        f"busy-guard release: nothing to release: no lifecycle action of hook 'busy-guard' is pending "
        f"for {idle} in {GROUP} (InService); nothing was changed"
    )
    assert local.sandbox.item(idle).exists is False  # no released mark that would refuse new work
    assert idle in local.sandbox.instances(GROUP)

    assert local.main("release", GONE_ID, "--yes") == 3
    assert capsys.readouterr().err.strip() == (
        f"busy-guard release: nothing to release: {GONE_ID} is not in any Auto Scaling group in "
        f"{REGION} (--asg NAME tries that group anyway)"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "expected"), [("yes\n", 0), ("no\n", 2), ("", 2)])
def test_release_asks_for_confirmation(
    local: Local,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    expected: int,
) -> None:
    busy = local.waiting_busy_instance()
    monkeypatch.setattr(sys, "stdin", Terminal(answer))
    code = local.main("release", busy, "--asg", GROUP, "--reason", "stuck")
    out, err = capsys.readouterr()
    assert code == expected
    assert out.startswith(
        f"{busy} (group {GROUP}, Terminating:Wait): complete lifecycle hook 'busy-guard' with CONTINUE, "
        "so Auto Scaling goes on with its termination.\n"
        "BUSY: bulk_table_insert (worker-1:4242), running for 6m00s, will be interrupted.\n"
        "The guard has held it for 4m00s.\n"
        "Type 'yes' to release it: "
    )
    emulator = local.sandbox.emulator
    if expected == 0:
        assert emulator.completions(busy)
    else:
        assert err.strip() == "busy-guard release: not confirmed: nothing was released"
        assert not emulator.completions(busy)
        assert emulator.state(busy) == "Terminating:Wait" and local.sandbox.item(busy).released is None


def test_status_shows_a_waiting_instance(local: Local, capsys: pytest.CaptureFixture[str]) -> None:
    busy = local.waiting_busy_instance()
    assert local.main("status", "--asg", GROUP, "--json") == 0
    rows = {row["instance_id"]: row for row in json.loads(capsys.readouterr().out)["instances"]}
    row = rows[busy]
    assert row["lifecycle_state"] == "Terminating:Wait"
    assert row["draining"]["waiting_seconds"] == 240 and row["draining"]["hook"] == HOOK
    assert row["guard_would"]["action"] == "WAIT" and row["guard_would"]["reason"] == "busy"
    assert row["leases"][0]["age_seconds"] == 360

    assert local.main("status", "--asg", GROUP) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(busy))
    assert "Terminating:Wait" in line and "for 4m00s" in line and "WAIT (busy)" in line
    assert out.rstrip().endswith("3 instance(s), 1 busy, 1 in Terminating:Wait, 1 draining")


# --- demo ------------------------------------------------------------------------------------------------
def fake_demo(monkeypatch: pytest.MonkeyPatch, run_demo: Any) -> None:
    module = types.ModuleType("busy_guard.sandbox.demo")
    module.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "busy_guard.sandbox.demo", module)


def test_demo_calls_run_demo_and_exits_with_its_code(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def run_demo(**kwargs: Any) -> int:
        calls.append(kwargs)
        return 4

    fake_demo(monkeypatch, run_demo)
    assert main(["demo", "--speed", "120", "--scenario", "busy", "idle", "--scenario", "crash"]) == 4
    assert calls == [{"speed": 120.0, "scenarios": ["busy", "idle", "crash"], "out": sys.stdout}]
    assert main(["demo"]) == 4
    assert calls[-1] == {"out": sys.stdout}  # the demo's own defaults
    assert main(["demo", "--engine", "dynamodb-local"]) == 4
    assert calls[-1] == {"engine": "dynamodb-local", "out": sys.stdout}


def test_demo_without_moto_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run_demo(**_: Any) -> int:
        raise ModuleNotFoundError("No module named 'moto'", name="moto")

    fake_demo(monkeypatch, run_demo)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err.strip() == (
        "busy-guard demo: the demo needs the sandbox extra (moto is missing): "
        "in a checkout of the repository, 'make demo' (or pip install -e '.[sandbox]')"
    )
