"""``busy-guard demo`` is the project's end-to-end test: the real writer library and the real guard
handler on moto plus the lifecycle-hook emulator, four scenarios, each checked against what must
happen. These tests run it and make sure its verdict can also fail."""

from __future__ import annotations

import io
import json

import pytest

from busy_guard.sandbox.demo import SCENARIOS, run_demo

# The demo runs the isolated key scheme, as `make demo` and every new deployment do.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_keys")]


def test_every_scenario_passes(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert run_demo(speed=None, scenarios=None, out=out) == 0, out.getvalue()
    text = out.getvalue()
    verdicts = [line for line in text.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == len(SCENARIOS) == 4
    assert all(line.startswith("PASS  ") for line in verdicts), text
    assert (
        "PASS  instance refresh with a long operation — released 0s after the operation ended (stream), "
        "others at once"
    ) in verdicts
    assert (
        "PASS  crashed writer — released as stale at +06:00, the first tick after lease expiry (+05:00) "
        "+ 30s skew"
    ) in verdicts
    assert any(
        v.startswith("PASS  work refused on a draining instance — InstanceDrainingError; the running lease")
        for v in verdicts
    )
    assert (
        "PASS  max_wait reached — released at max_wait (30m, CONTINUE), never by the hook's 15m timeout"
        in verdicts
    )
    # The timelines show what happened, on simulated time.
    assert "guard (stream): CONTINUE idle after 24m20s → hook completed CONTINUE → terminated" in text
    assert "refused: InstanceDrainingError (draining since +01:00)" in text
    # A heartbeat only when a third of the 15-minute HeartbeatTimeout has passed: 5 in 24 ticks.
    assert (
        "+02:00…+25:00  24 schedule ticks: guard WAIT busy (bulk_table_insert), hook heartbeat x5, "
        "lease renewed x24"
    ) in text
    assert text.rstrip().splitlines()[-1].startswith("4/4 scenarios passed in ")
    # The guard's JSON logs and EMF metrics stay out of the output, and nothing else is printed.
    assert not [line for line in text.splitlines() if line.lstrip().startswith("{")]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert not [line for line in captured.err.splitlines() if _is_json(line)]


def test_a_misconfigured_guard_fails_the_demo() -> None:
    """max_wait shorter than the operation: the guard lets the instance go while the work runs."""
    out = io.StringIO()
    code = run_demo(scenarios=["refresh"], out=out, guard_env={"BUSY_GUARD_MAX_WAIT_SECONDS": "600"})
    text = out.getvalue()
    assert code == 1, text
    [verdict] = [line for line in text.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert verdict.startswith("FAIL  instance refresh with a long operation — ")
    assert (
        "was released at +11:00, while its bulk_table_insert was still running (it ended at +25:20)"
        in verdict
    )
    assert "released: max_wait_exceeded, not idle" in text
    assert text.rstrip().splitlines()[-1].startswith("0/1 scenarios passed in ")


def test_a_guard_that_never_answers_fails_on_the_hook_timeout() -> None:
    """The guard watches another hook: ours times out (DefaultResult), which the demo must call out."""
    out = io.StringIO()
    assert run_demo(scenarios=["1"], out=out, guard_env={"BUSY_GUARD_HOOK_NAME": "not-ours"}) == 1
    text = out.getvalue()
    assert "FAIL  instance refresh with a long operation — " in text
    assert "was released by the hook's heartbeat timeout at +15:00, not by the guard" in text
    assert "hook heartbeat timeout on " in text


def test_bad_arguments_exit_2() -> None:
    out = io.StringIO()
    assert run_demo(scenarios=["no-such-scenario"], out=out) == 2
    assert "no scenario 'no-such-scenario'; choose from refresh, crashed-writer, draining, max-wait" in (
        out.getvalue()
    )
    assert run_demo(speed=0, out=io.StringIO()) == 2


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_the_command_runs_on_a_machine_with_a_foreign_aws_setup() -> None:
    """`make demo` as a newcomer runs it: the console script in a fresh process, with an AWS
    profile that doesn't exist here and an endpoint override in the environment."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("busy-guard")
    env = {**os.environ, "AWS_PROFILE": "no-such-profile", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    result = subprocess.run(
        [str(script), "demo", "--scenario", "crashed-writer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "PASS  crashed writer" in result.stdout
    assert "1/1 scenarios passed" in result.stdout


def test_the_demo_runs_on_dynamodb_local() -> None:
    """`busy-guard demo --engine dynamodb-local`: the console script starts Amazon DynamoDB Local and
    keeps the table and its stream there, so the guard is woken by the engine's real stream records
    through the stack's filter; every scenario gets the same verdict as on moto, and the server is
    gone when the command returns."""
    import re
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("busy-guard")
    result = subprocess.run(
        [str(script), "demo", "--engine", "dynamodb-local"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    assert "4/4 scenarios passed" in text
    assert (
        "PASS  instance refresh with a long operation — released 0s after the operation ended (stream), "
        "others at once"
    ) in text
    assert "guard (stream): CONTINUE idle after 24m20s → hook completed CONTINUE → terminated" in text
    [port] = re.findall(r"Amazon DynamoDB Local \(http://127\.0\.0\.1:(\d+)\)", text)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(port))) != 0, "DynamoDB Local outlived the demo"
