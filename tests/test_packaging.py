"""What an application instance installs: the sdist and wheel as a release builds them, and the wheel
in a fresh virtualenv with nothing but boto3, at the floors pyproject.toml declares.

Slow (a build and two venv installs from pip's cache, about half a minute together), so marked
``slow``; ``make test`` runs them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import moto_server, user_env  # the CLI tests' moto_server fixture, reused

import busy_guard

__all__ = ["moto_server"]  # a fixture: imported to be found by pytest, not called here

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
INSTANCE = "i-0123456789abcdef0"
# boto3 and what it depends on (botocore, jmespath, s3transfer, urllib3, python-dateutil, six).
BOTO3_CLOSURE = frozenset({"boto3", "botocore", "jmespath", "s3transfer", "urllib3", "dateutil", "six"})


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


def floor_pins(requirements: list[str]) -> list[str]:
    """``name==floor`` for each ``name>=floor`` requirement: what the tests install to prove a floor."""
    pins = []
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(?:,<[0-9.]+)?", requirement.replace(" ", ""))
        assert match, f"a floor the packaging test cannot pin: {requirement!r}"
        pins.append(f"{match[1]}=={match[2]}")
    return pins


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The sdist, and the wheel built from that sdist (python -m build's default order)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return Dist(wheel, sdist)


def fresh_venv(path: Path, *requirements: str) -> Path:
    """A virtualenv with exactly ``requirements`` (and their dependencies); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = path / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--disable-pip-version-check", *requirements],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return python


def installed(python: Path) -> set[str]:
    listing = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(*(d.name for d in m.distributions()))"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return {name.lower().replace("_", "-") for name in listing.stdout.split()}


@pytest.fixture(scope="module")
def writer_venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel with its base dependencies only, boto3 and botocore pinned to their floors."""
    return fresh_venv(tmp_path_factory.mktemp("writer-venv"), str(dist.wheel), *floor_pins(
        PYPROJECT["project"]["dependencies"]
    ))  # fmt: skip


def outside_env(**extra: str) -> dict[str, str]:
    """A user's environment, run from outside the checkout: nothing of the repository is importable."""
    env = {k: v for k, v in user_env(**extra).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env


# --- what the artifacts hold ------------------------------------------------------------------------------
def test_the_wheel_holds_the_runtime_package_its_license_and_version(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = wheel.namelist()
        info = f"busy_guard-{busy_guard.__version__}.dist-info"
        metadata = wheel.read(f"{info}/METADATA").decode()
        license_text = wheel.read(f"{info}/licenses/LICENSE").decode()
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert dist.wheel.name == f"busy_guard-{busy_guard.__version__}-py3-none-any.whl"
    assert not [name for name in names if "sandbox" in name]
    assert {name.split("/")[0] for name in names} == {"busy_guard", info}
    for module in ("__init__.py", "_version.py", "_console.py", "writer.py", "identity.py", "py.typed"):
        assert f"busy_guard/{module}" in names
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert re.search(r"^Version: (.+)$", metadata, re.M)[1] == busy_guard.__version__  # type: ignore[index]
    assert "License-Expression: Apache-2.0" in metadata
    base = sorted(re.findall(r"^Requires-Dist: ([^;\n]+)$", metadata, re.M))
    assert base == ["boto3>=1.44", "botocore>=1.44"]  # pydantic only with an extra
    assert re.search(r'^Requires-Dist: pydantic[^;]*; extra == "guard"$', metadata, re.M)
    assert "busy-guard = busy_guard._console:main" in entry_points


def test_the_sdist_holds_the_package_and_license_and_no_tests(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as sdist:
        names = [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]
        pkg_info = sdist.extractfile(f"busy_guard-{busy_guard.__version__}/PKG-INFO")
        assert pkg_info is not None
        version = re.search(r"^Version: (.+)$", pkg_info.read().decode(), re.M)
    assert version is not None and version[1] == busy_guard.__version__
    assert {"LICENSE", "README.md", "pyproject.toml", "lambdas/busy_guard/writer.py"} <= set(names)
    assert not [name for name in names if name.startswith(("tests", "infra", "docs")) or "sandbox" in name]


# --- the wheel in a fresh venv with boto3 alone -----------------------------------------------------------
WRITER_SCRIPT = """
import json, logging, socket, sys
import boto3, botocore
import busy_guard
from busy_guard import instance_busy_sync

endpoint, table, instance = sys.argv[1:4]
dynamodb = boto3.client("dynamodb", endpoint_url=endpoint)
dynamodb.create_table(
    TableName=table,
    KeySchema=[{"AttributeName": "instance_id", "KeyType": "HASH"}],
    AttributeDefinitions=[{"AttributeName": "instance_id", "AttributeType": "S"}],
    BillingMode="PAY_PER_REQUEST",
)
def item():
    key = {"instance_id": {"S": instance}}
    return dynamodb.get_item(TableName=table, Key=key, ConsistentRead=True)["Item"]

seen = {}
with instance_busy_sync(instance, "packaging", table=table, endpoint_url=endpoint) as lease:
    seen["lease_taken"] = lease is not None
    seen["kinds_during"] = [v["M"]["kind"]["S"] for v in item()["leases"]["M"].values()]
seen["leases_after"] = len(item()["leases"]["M"])
seen["counter_after"] = item()["active_destructive_ops"]["N"]

# The dead-endpoint budget at this botocore: botocore logs each retry's backoff before it sleeps.
sleeps = []
class Sleeps(logging.Handler):
    def emit(self, record):
        if record.msg.startswith("Response received to retry, sleeping for"):
            sleeps.append(float(record.args[0]))
endpoint_log = logging.getLogger("botocore.endpoint")
endpoint_log.setLevel(logging.DEBUG)
endpoint_log.addHandler(Sleeps())
hanging = socket.socket()
hanging.bind(("127.0.0.1", 0))
hanging.listen(16)  # accepts (the kernel's backlog) and never answers
dead = f"http://127.0.0.1:{hanging.getsockname()[1]}"
with instance_busy_sync(instance, "k", table=table, endpoint_url=dead) as lease:
    seen["lease_on_a_dead_endpoint"] = lease is not None
seen["retry_sleeps"] = sleeps

seen["third_party_modules"] = sorted(
    {name.split(".")[0] for name in sys.modules} - set(sys.stdlib_module_names) - {"__main__", "__mp_main__"}
)
seen["busy_guard_file"] = busy_guard.__file__
seen["versions"] = [busy_guard.__version__, boto3.__version__, botocore.__version__]
print(json.dumps(seen))
"""


def test_instance_busy_sync_from_the_wheel_with_boto3_alone_at_its_floor(
    writer_venv: Path, moto_server: str, tmp_path: Path
) -> None:
    assert not {"pydantic", "moto", "aws-lambda-powertools"} & installed(writer_venv)
    table = f"busy-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [str(writer_venv), "-c", WRITER_SCRIPT, moto_server, table, INSTANCE],
        check=False, cwd=tmp_path, env=outside_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["lease_taken"] and seen["kinds_during"] == ["packaging"]
    assert seen["leases_after"] == 0 and seen["counter_after"] == "0"
    # Imported from the venv, not the checkout; nothing outside boto3's closure was imported.
    assert seen["busy_guard_file"].startswith(str(writer_venv.parent.parent))
    assert set(seen["third_party_modules"]) <= BOTO3_CLOSURE | {"busy_guard"}, seen["third_party_modules"]
    floors = [pin.split("==")[1] for pin in floor_pins(PYPROJECT["project"]["dependencies"])]
    for version, floor in zip(seen["versions"][1:], floors, strict=True):  # boto3, botocore
        assert version == floor or version.startswith(f"{floor}."), (version, floor)
    assert seen["versions"][0] == busy_guard.__version__
    # One retry, after at most 25 ms (botocore >= 1.44 for DynamoDB): begin costs two read timeouts.
    assert seen["lease_on_a_dead_endpoint"] is False
    assert len(seen["retry_sleeps"]) == 1 and 0 <= seen["retry_sleeps"][0] <= 0.025, seen["retry_sleeps"]


def test_the_console_script_without_the_cli_extra_names_the_extra(writer_venv: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(writer_venv.parent / "busy-guard"), "status"],
        check=False, cwd=tmp_path, env=outside_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "busy-guard: the command line needs the 'cli' extra (pydantic is not installed): "
        f"pip install 'busy-guard[cli] @ git+https://github.com/<owner>/busy-guard@v{busy_guard.__version__}'"
    ]


@pytest.fixture(scope="module")
def cli_venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel with the cli extra, every floor of it pinned (boto3, botocore, pydantic)."""
    floors = floor_pins(
        [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["guard"]]
    )
    yield fresh_venv(tmp_path_factory.mktemp("cli-venv"), f"{dist.wheel}[cli]", *floors)


def test_the_cli_from_the_wheel_at_its_floors(cli_venv: Path, moto_server: str, tmp_path: Path) -> None:
    assert "pydantic" in installed(cli_venv) and "moto" not in installed(cli_venv)
    script = str(cli_venv.parent / "busy-guard")
    table = f"busy-{uuid.uuid4().hex[:8]}"
    env = outside_env(BUSY_GUARD_INSTANCE_ID=INSTANCE)
    create = (
        "import boto3, sys; boto3.client('dynamodb', endpoint_url=sys.argv[1])"
        ".create_table(TableName=sys.argv[2],"
        " KeySchema=[{'AttributeName': 'instance_id', 'KeyType': 'HASH'}],"
        " AttributeDefinitions=[{'AttributeName': 'instance_id', 'AttributeType': 'S'}],"
        " BillingMode='PAY_PER_REQUEST')"
    )
    subprocess.run([str(cli_venv), "-c", create, moto_server, table], env=env, check=True, timeout=60)
    run = subprocess.run(
        [script, "run", "--endpoint-url", moto_server, "--table", table, "--kind", "wheel", "--", "true"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    read = (
        "import boto3, sys; print(boto3.client('dynamodb', endpoint_url=sys.argv[1])"
        ".get_item(TableName=sys.argv[2],"
        " Key={'instance_id': {'S': sys.argv[3]}})['Item']['last_destructive_op_kind']['S'])"
    )
    kind = subprocess.run(
        [str(cli_venv), "-c", read, moto_server, table, INSTANCE],
        env=env, check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert kind.stdout.strip() == "wheel"  # the lease was taken on $BUSY_GUARD_INSTANCE_ID's item
    demo = subprocess.run(
        [script, "demo"], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert demo.returncode == 2
    assert demo.stderr.strip().startswith("busy-guard demo: the demo runs from the repository")
