"""The guard acts only on lifecycle events of its own stack's account (BUSY_GUARD_ACCOUNT_ID), and
each tick reports how many instances it holds (the dashboard's first graph)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import pytest

from busy_guard.sandbox.clock import ManualClock
from busy_guard.sandbox.world import ACCOUNT, Sandbox, SandboxSettings
from busy_guard.settings import Env

GROUP = "graph-db"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    settings = SandboxSettings(env={Env.ACCOUNT_ID: ACCOUNT})
    with Sandbox.start(settings, clock=ManualClock(1_700_000_000.0)) as sb:
        yield sb


def test_an_event_from_another_account_is_ignored_and_its_own_account_is_served(sandbox: Sandbox) -> None:
    instance = sandbox.instances(GROUP)[0]
    (event,) = sandbox.terminate(instance, deliver=False)
    forged = copy.deepcopy(event)
    forged["account"] = "210987654321"

    answer = sandbox.invoke(forged)

    assert answer == {"ignored": "not ours: account '210987654321'"}
    assert sandbox.emulator.state(instance) == "Terminating:Wait"
    assert sandbox.item(instance).draining is None  # not even marked

    sandbox.invoke(event)
    assert sandbox.emulator.state(instance) == "Terminated"


def emitted(capsys: pytest.CaptureFixture[str], name: str) -> list[float]:
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    values = [line[name] for line in lines if "_aws" in line and name in line]
    return [v for value in values for v in (value if isinstance(value, list) else [value])]


def test_each_tick_reports_how_many_instances_the_hook_holds(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    busy, idle = sandbox.instances(GROUP)[:2]
    sandbox.begin(busy)
    sandbox.tick()
    assert emitted(capsys, "InstancesWaiting") == [0]
    sandbox.terminate(busy)
    sandbox.terminate(idle)
    capsys.readouterr()
    sandbox.tick()
    assert emitted(capsys, "InstancesWaiting") == [1]  # the idle one was released at once
