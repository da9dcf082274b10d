"""``busy-guard drain`` / ``undrain`` as a user runs them: the real command in a subprocess against a
real ``moto_server``; the guard (with the lifecycle-hook emulator behind its real boto3 client) runs
in this process against the same server, so a termination during maintenance meets the real guard.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from test_cli import (
    CLI,
    GROUP,
    HOOK,
    REGION,
    TABLE,
    World,
    cli,
    moto_server,
    new_instance,
    put_lease,
    user_env,
)

from busy_guard import schema
from busy_guard.guard import handler
from busy_guard.guard.autoscaling import LifecycleHooks
from busy_guard.guard.config import GuardConfig
from busy_guard.guard.planner import End as Step
from busy_guard.guard.reconcile import Guard
from busy_guard.guard.table import BusyTable
from busy_guard.sandbox import ManualClock
from busy_guard.sandbox.hooks import LifecycleHookEmulator
from busy_guard.sandbox.world import Sandbox, scheduled_event
from busy_guard.writer import InstanceDrainingError, begin_destructive_op_sync

__all__ = ["moto_server"]  # the module-scoped server fixture, shared by name

FAST = ["--poll", "0.2"]


@pytest.fixture(scope="module")
def world(moto_server: str) -> World:
    return World(moto_server)


def drain_args(world: World, *args: str) -> list[str]:
    return ["drain", *args, "--endpoint-url", world.endpoint, *FAST]


class Running:
    """A CLI process whose stderr is read line by line while it runs."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [*CLI, *args],
            env=env or user_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"never printed {text!r}; stderr so far:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 20) -> tuple[int, str, str]:
        code = self.process.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        assert self.process.stdout is not None
        return code, self.process.stdout.read(), "\n".join(self.lines)


def busy_lease(world: World, instance: str, kind: str = "bulk_table_insert") -> schema.Lease:
    return put_lease(world.dynamodb, instance, kind, "worker-1:4242", started=time.time() - 300, ttl=3600)


def end_lease(world: World, instance: str, lease: schema.Lease) -> None:
    request = schema.end_update(lease.lease_id, kind=lease.kind, now=time.time())
    world.dynamodb.update_item(TableName=TABLE, Key=schema.key(instance), **request)


# The command drain runs: records which instance it was run for, and how many leases it saw then.
RECORD = """
import os, sys, boto3
client = boto3.client("dynamodb", endpoint_url=os.environ["ENDPOINT"])
iid = os.environ["BUSY_GUARD_INSTANCE_ID"]
item = client.get_item(TableName=sys.argv[1], Key={"instance_id": {"S": iid}})["Item"]
marked = sorted(
    i["instance_id"]["S"] for i in client.scan(TableName=sys.argv[1])["Items"] if "maintenance" in i
)
with open(sys.argv[2], "a") as out:
    out.write(f"{iid} leases={len(item.get('leases', {}).get('M', {}))} marked={','.join(marked)}\\n")
sys.exit(int(os.environ.get("FAIL_ON", "") == iid))
"""


def record_cmd(log: Path) -> list[str]:
    return ["--", sys.executable, "-c", RECORD, TABLE, str(log)]


def test_drain_an_idle_instance_runs_the_command_at_once(world: World, tmp_path: Path) -> None:
    instance, log = new_instance(), tmp_path / "log"
    result = cli(*drain_args(world, instance), *record_cmd(log), env=user_env(ENDPOINT=world.endpoint))
    assert result.returncode == 0, result.stderr
    assert log.read_text() == f"{instance} leases=0 marked={instance}\n"  # the mark held while CMD ran
    assert f"{instance}: no live lease after 0s" in result.stderr
    assert "waiting for" not in result.stderr
    state = world.item(instance)
    assert state.maintenance is None and state.last_maintenance is not None
    assert state.last_maintenance.result == "ok" and state.last_maintenance.forced is False
    assert state.last_maintenance.by.startswith("arn:aws:")


def test_drain_a_busy_instance_waits_refuses_new_work_then_runs_the_command(
    world: World, tmp_path: Path
) -> None:
    instance, log = new_instance(), tmp_path / "log"
    lease = busy_lease(world, instance)
    drain = Running([*drain_args(world, instance), *record_cmd(log)], env=user_env(ENDPOINT=world.endpoint))
    line = drain.wait_for(f"waiting for {instance}")
    assert "bulk_table_insert (worker-1:4242) for 5m0" in line and "of 30m00s" in line
    # Writers refuse new work exactly as while the guard drains for a termination.
    client = boto3.client("dynamodb", endpoint_url=world.endpoint, region_name=REGION)
    with pytest.raises(InstanceDrainingError, match=f"instance {instance} is in maintenance since"):
        begin_destructive_op_sync(instance, "late_job", table=TABLE, client=client)
    assert not log.exists()
    end_lease(world, instance, lease)
    code, _, err = drain.finish()
    assert code == 0, err
    assert log.read_text() == f"{instance} leases=0 marked={instance}\n"
    assert world.item(instance).maintenance is None


def test_max_wait_exits_124_without_the_command_and_clears_the_mark(world: World, tmp_path: Path) -> None:
    instance, log = new_instance(), tmp_path / "log"
    busy_lease(world, instance)
    result = cli(*drain_args(world, instance, "--max-wait", "1s"), *record_cmd(log))
    assert result.returncode == 124, result.stderr
    assert f"timed out after 1s: {instance} still runs bulk_table_insert (worker-1:4242)" in result.stderr
    assert not log.exists()
    state = world.item(instance)
    assert state.maintenance is None and state.last_maintenance is not None
    assert state.last_maintenance.result == "timeout"
    assert len(state.leases) == 1  # the work itself is never touched


def test_force_proceeds_at_once_and_is_recorded(world: World, tmp_path: Path) -> None:
    instance, log = new_instance(), tmp_path / "log"
    busy_lease(world, instance)
    args = drain_args(world, instance, "--force", "--reason", "hung load, INC-42")
    result = cli(*args, *record_cmd(log), env=user_env(ENDPOINT=world.endpoint))
    assert result.returncode == 0, result.stderr
    assert log.read_text() == f"{instance} leases=1 marked={instance}\n"
    assert f"forced: not waiting for {instance}: bulk_table_insert (worker-1:4242) for 5m" in result.stderr
    record = world.item(instance).last_maintenance
    assert record is not None and record.forced is True and record.reason == "hung load, INC-42"
    assert record.by.startswith("arn:aws:sts::") and record.result == "ok"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_waiting_clears_the_mark(world: World, signum: int, code: int, tmp_path: Path) -> None:
    instance, log = new_instance(), tmp_path / "log"
    busy_lease(world, instance)
    drain = Running([*drain_args(world, instance), *record_cmd(log)])
    drain.wait_for(f"waiting for {instance}")
    assert world.item(instance).maintenance is not None
    drain.process.send_signal(signum)
    status, _, err = drain.finish()
    assert status == code, err
    assert "interrupted after" in err and f"{instance}: maintenance mark cleared (interrupted)" in err
    assert world.item(instance).maintenance is None and not log.exists()


def test_the_command_status_is_drains_and_the_mark_is_cleared(world: World) -> None:
    instance = new_instance()
    result = cli(*drain_args(world, instance), "--", sys.executable, "-c", "raise SystemExit(9)")
    assert result.returncode == 9
    record = world.item(instance).last_maintenance
    assert world.item(instance).maintenance is None and record is not None and record.result == "exit 9"


def test_a_second_drain_is_refused_and_undrain_clears_a_stuck_mark(world: World) -> None:
    instance = new_instance()
    stuck = schema.Maintenance(since=time.time() - 7200, by="ci-job-17", reason="restart", token="t0")
    assert world.table.begin_maintenance(instance, stuck)[0]
    result = cli(*drain_args(world, instance), "--", "true")
    assert result.returncode == 4
    assert f"{instance} is already in maintenance since" in result.stderr and "by ci-job-17" in result.stderr
    assert world.item(instance).maintenance == stuck  # the other drain's mark is left alone

    result = cli("undrain", instance, "--endpoint-url", world.endpoint)
    assert result.returncode == 0, result.stderr
    assert (
        f"cleared the maintenance mark of {instance} (taken 2h00m ago by ci-job-17: restart)" in result.stdout
    )
    state = world.item(instance)
    assert state.maintenance is None and state.last_maintenance is not None
    assert state.last_maintenance.result.startswith("undrain by arn:aws:")
    result = cli("undrain", instance, "--endpoint-url", world.endpoint)
    assert result.returncode == 3 and "no maintenance mark" in result.stderr


def test_drain_needs_one_target(world: World) -> None:
    for args in (["drain", "--", "true"], ["drain", new_instance(), "--asg", GROUP]):
        result = cli(*args, "--endpoint-url", world.endpoint)
        assert result.returncode == 2 and "give either INSTANCE_ID or --asg NAME" in result.stderr


# --- rolling through a group ---------------------------------------------------------------------------
def test_asg_rolls_one_at_a_time_in_order_and_stops_at_the_first_failure(
    world: World, tmp_path: Path
) -> None:
    first, second, third = world.instances()
    log = tmp_path / "log"
    env = user_env(ENDPOINT=world.endpoint, FAIL_ON=second)
    result = cli(*drain_args(world, "--asg", GROUP), *record_cmd(log), env=env)
    assert result.returncode == 1, result.stderr
    # One at a time: while CMD ran on an instance, only that instance was in maintenance.
    assert log.read_text().splitlines() == [
        f"{first} leases=0 marked={first}",
        f"{second} leases=0 marked={second}",
    ]
    assert f"[1/3] {first}" in result.stderr and f"[2/3] {second}" in result.stderr
    assert f"stopping at the first failure (exit 1); not drained: {third}" in result.stderr
    assert all(world.item(iid).maintenance is None for iid in (first, second, third))
    assert world.item(third).last_maintenance is None  # never touched


def test_asg_batches(world: World, tmp_path: Path) -> None:
    first, second, third = world.instances()
    log = tmp_path / "log"
    result = cli(
        *drain_args(world, "--asg", GROUP, "--batch", "2"),
        *record_cmd(log),
        env=user_env(ENDPOINT=world.endpoint),
    )
    assert result.returncode == 0, result.stderr
    lines = sorted(log.read_text().splitlines())
    assert lines == [
        f"{first} leases=0 marked={first},{second}",
        f"{second} leases=0 marked={first},{second}",
        f"{third} leases=0 marked={third}",
    ]
    assert f"all 3 instance(s) of {GROUP} drained" in result.stderr


# --- the guard meets a drain ----------------------------------------------------------------------
def guard_on(world: World, **env: str) -> tuple[Guard, LifecycleHookEmulator]:
    """The real guard on moto_server, its autoscaling client behind the lifecycle-hook emulator."""
    session = boto3.Session(region_name=REGION)
    ec2 = session.client("ec2", endpoint_url=world.endpoint)
    autoscaling: Any = session.client("autoscaling", endpoint_url=world.endpoint)
    emulator = LifecycleHookEmulator(world.autoscaling, ec2=ec2)
    emulator.attach(autoscaling)
    config = GuardConfig.from_env(
        {
            "BUSY_GUARD_TABLE": TABLE,
            "BUSY_GUARD_ASG_NAMES": GROUP,
            "BUSY_GUARD_HOOK_NAME": HOOK,
            "BUSY_GUARD_KEY_SCHEME": "legacy",
            **env,
        }
    )
    table = BusyTable(session.client("dynamodb", endpoint_url=world.endpoint), TABLE)
    return Guard(table=table, hooks=LifecycleHooks(autoscaling, HOOK), config=config), emulator


@pytest.fixture
def guard(world: World) -> Iterator[tuple[Guard, LifecycleHookEmulator]]:
    yield guard_on(world)


def test_a_termination_during_maintenance_is_still_held(
    world: World, guard: tuple[Guard, LifecycleHookEmulator], tmp_path: Path
) -> None:
    the_guard, emulator = guard
    instance = world.instances()[0]
    lease = busy_lease(world, instance)
    log = tmp_path / "log"
    drain = Running([*drain_args(world, instance), *record_cmd(log)], env=user_env(ENDPOINT=world.endpoint))
    drain.wait_for(f"waiting for {instance}")

    (event,) = emulator.terminate(instance)
    (outcome,) = handler.route(event, the_guard)["outcomes"]
    assert outcome["step"] == str(Step.WAITING) and outcome["reason"] == "busy"
    assert emulator.state(instance) == "Terminating:Wait"
    state = world.item(instance)
    assert state.draining is not None and state.maintenance is not None  # two marks, two owners
    outcomes = handler.route(scheduled_event(time.time()), the_guard)["outcomes"]
    assert [(o["instance_id"], o["step"]) for o in outcomes] == [(instance, str(Step.HEARTBEAT))]

    end_lease(world, instance, lease)
    code, _, err = drain.finish()
    assert code == 0, err
    assert f"{instance} is terminating (the guard holds it)" not in err  # it was not, when marked
    state = world.item(instance)
    assert state.maintenance is None and state.draining is not None  # drain never clears the guard's mark
    assert emulator.state(instance) == "Terminating:Wait"  # nor does it release the termination

    outcomes = handler.route(scheduled_event(time.time()), the_guard)["outcomes"]
    assert [(o["instance_id"], o["step"], o["reason"]) for o in outcomes] == [
        (instance, str(Step.COMPLETED), "idle")
    ]
    assert emulator.completions(instance)[0].result == "CONTINUE"


def test_the_guard_never_reads_a_maintenance_mark_as_a_termination() -> None:
    """Through the sandbox (the real handler, its three triggers): a maintenance mark starts no wait,
    wakes no stream invocation, and survives the guard's release of a real termination."""
    clock = ManualClock(time.time())
    with Sandbox.start(clock=clock) as sandbox:
        instance = sandbox.instances(GROUP)[0]
        mark = schema.Maintenance(since=clock(), by="ci", reason="restart", token="t1")
        assert sandbox.guard.table.begin_maintenance(instance, mark)[0]
        assert sandbox.pump_stream() is None  # the stream filter never matches a maintenance write
        assert sandbox.tick()["outcomes"] == []
        state = sandbox.item(instance)
        assert state.draining is None and state.released is None and state.maintenance == mark
        assert sandbox.emulator.state(instance) == "InService"

        sandbox.terminate(instance)  # no lease: the termination is released at once, as ever
        assert [c.result for c in sandbox.emulator.completions(instance)] == ["CONTINUE"]
        state = sandbox.item(instance)
        assert state.released is not None and state.released.reason == "idle"
        assert state.maintenance == mark  # the guard never clears it
