"""What every command shares: exit codes, the one-line error, argument types, the boto3 clients."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)
from botocore.parsers import ResponseParserError

from busy_guard.guard.config import REGION_ENV, ConfigError, GuardConfig
from busy_guard.guard.table import BusyTable
from busy_guard.identity import InvalidInstanceIdError, validate_instance_id
from busy_guard.settings import DEFAULT_KEY_SCHEME, KEY_SCHEME_ISOLATED, KEY_SCHEME_LEGACY, Env

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_dynamodb import DynamoDBClient

PROG = "busy-guard"
DEFAULT_TABLE = "busy_guard.instance_busy"
DEFAULT_HOOK = "busy-guard"
ENV_TABLE = Env.TABLE
ENV_ASG_NAMES = Env.ASG_NAMES
ENV_HOOK = Env.HOOK_NAME

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOTHING_TO_RELEASE = 3
EXIT_IN_MAINTENANCE = 4
EXIT_DRAINING = 75  # EX_TEMPFAIL, spelled out: os.EX_* exist only on Unix
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    unexpected error (AWS unreachable, an unlisted AWS error)
  2    bad usage or configuration: bad arguments, missing table, unknown group,
       missing credentials or region; release not confirmed
  3    release: nothing to release (no lifecycle action of our hook is pending);
       undrain: no maintenance mark to clear
  4    drain: another drain holds the instance
  75   run: refused, the instance is draining (EX_TEMPFAIL)
  124  drain: --max-wait passed with work still running (the mark is cleared)
  126  run, drain: command not executable; 127: command not found
  130  interrupted (143: SIGTERM); drain clears its mark first
  N    run, drain: the command's own status (128+N when killed by signal N)
"""

# status and release: patient enough for a slow API, bounded for a dead endpoint.
AWS_CONFIG = Config(connect_timeout=3, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 3})

_TABLE_OPERATIONS = frozenset({"GetItem", "BatchGetItem", "Scan", "UpdateItem", "DescribeTable", "Query"})
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "MissingAuthenticationToken",
    }
)
_ACCESS_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})


class CliError(Exception):
    """A failure to report as one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# --- argument parsing ------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def epilog(*examples: str, extra: str = "") -> str:
    lines = ["examples:", *(f"  {example}" for example in examples), ""]
    if extra:
        lines.extend([extra, ""])
    return "\n".join(lines) + "\n" + EXIT_CODES_HELP


def group_names(values: Iterable[str]) -> list[str]:
    """Group names from repeated and/or comma-separated values, in order, without duplicates."""
    names = [name.strip() for value in values for name in value.split(",")]
    return list(dict.fromkeys(name for name in names if name))


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def instance_id(text: str) -> str:
    try:
        return validate_instance_id(text, "an instance id argument")
    except InvalidInstanceIdError as error:  # argparse names the argument itself
        raise argparse.ArgumentTypeError(error.reason) from None


def endpoint_url(text: str) -> str:
    """An http(s) URL with a host: botocore's own check fails later, as an unexpected error."""
    parsed = urllib.parse.urlsplit(text.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise argparse.ArgumentTypeError(
            f"not an http(s) URL with a host (like http://127.0.0.1:5000): {text!r}"
        )
    return text.strip()


def aws_options() -> Parser:
    """``--region --profile --endpoint-url --table --debug``, shared by the AWS commands."""
    parent = Parser(add_help=False)
    options = parent.add_argument_group("AWS options")
    options.add_argument("--region", help="AWS region (default: AWS_REGION or the profile's)")
    options.add_argument("--profile", help="AWS profile from ~/.aws/config (default: AWS_PROFILE)")
    options.add_argument(
        "--endpoint-url",
        type=endpoint_url,
        metavar="URL",
        help="send every AWS call to URL (moto_server, LocalStack)",
    )
    options.add_argument(
        "--table",
        default=os.environ.get(ENV_TABLE, "").strip() or DEFAULT_TABLE,
        help=f"the busy table (default: ${ENV_TABLE} or {DEFAULT_TABLE})",
    )
    options.add_argument("--debug", action="store_true", help="log AWS calls; tracebacks for errors")
    return parent


def hook_option() -> Parser:
    parent = Parser(add_help=False)
    parent.add_argument(
        "--hook",
        default=os.environ.get(ENV_HOOK, "").strip() or DEFAULT_HOOK,
        help=f"our lifecycle hook's name (default: ${ENV_HOOK} or {DEFAULT_HOOK})",
    )
    return parent


# --- AWS clients ----------------------------------------------------------------------------------------
@dataclass
class Aws:
    """One command's clients, each created on first use from one session."""

    session: boto3.Session
    endpoint_url: str | None
    region_override: str | None
    _cache: dict[tuple[str, int], Any] = field(default_factory=dict)

    @property
    def region(self) -> str:
        return self.region_override or self.session.region_name or "(no region)"

    def _client(self, service: str, config: Config) -> Any:
        key = (service, id(config))
        if key not in self._cache:
            self._cache[key] = self.session.client(
                service,  # type: ignore[call-overload]
                region_name=self.region_override,
                endpoint_url=self.endpoint_url,
                config=config,
            )
        return self._cache[key]

    def dynamodb(self, config: Config = AWS_CONFIG) -> DynamoDBClient:
        client: DynamoDBClient = self._client("dynamodb", config)
        return client

    def autoscaling(self) -> AutoScalingClient:
        client: AutoScalingClient = self._client("autoscaling", AWS_CONFIG)
        return client

    def sts(self) -> Any:
        return self._client("sts", AWS_CONFIG)


def new_session(args: argparse.Namespace) -> boto3.Session:
    """A session for ``--profile`` and ``--region``. botocore reads only ``AWS_DEFAULT_REGION``;
    ``AWS_REGION`` (what Lambda, the other SDKs and the writer library read) counts too."""
    region = args.region or os.environ.get("AWS_REGION", "").strip() or None
    return boto3.Session(profile_name=args.profile or None, region_name=region)


def clients(
    args: argparse.Namespace, session: boto3.Session | None, *, endpoint_url: str | None = None
) -> Aws:
    """Clients for ``--profile`` / ``--region`` / ``--endpoint-url``. A test passes its own session;
    its region then holds unless ``--region`` is given."""
    return Aws(session or new_session(args), endpoint_url or args.endpoint_url or None, args.region or None)


@dataclass
class Context:
    """What a command gets: its arguments, the injectable session and clock, lazy clients."""

    args: argparse.Namespace
    session: boto3.Session | None = None
    clock: Callable[[], float] = time.time
    _aws: Aws | None = None
    _identity: tuple[str, str] | None = None

    @property
    def aws(self) -> Aws:
        if self._aws is None:
            self._aws = clients(self.args, self.session)
        return self._aws

    def guard_config(self, groups: Sequence[str]) -> GuardConfig:
        """The guard's settings from the same BUSY_GUARD_* variables, with this command's names,
        validated by the guard's own model (a bad value is a one-line usage error)."""
        env = {name: value for name, value in os.environ.items() if name.startswith(Env.PREFIX)}
        env[ENV_TABLE] = self.args.table
        env[ENV_ASG_NAMES] = ",".join(groups) or "-"
        env[ENV_HOOK] = getattr(self.args, "hook", DEFAULT_HOOK)
        if env.get(Env.KEY_SCHEME, DEFAULT_KEY_SCHEME).strip() == KEY_SCHEME_ISOLATED:
            # Instance ARNs name the account, region and partition: this command's own, unless set.
            env[REGION_ENV] = self.aws.region_override or self.aws.session.region_name or ""
            if not env.get(Env.ACCOUNT_ID) or not env.get(Env.PARTITION):
                account, partition = self._caller()
                env.setdefault(Env.ACCOUNT_ID, account)
                env.setdefault(Env.PARTITION, partition)
        return GuardConfig.from_env(env)

    def busy_table(self, config: GuardConfig | None = None) -> BusyTable:
        """The busy table, keyed as the guard keys it (``BUSY_GUARD_KEY_SCHEME``)."""
        keys = (config or self.guard_config([])).keys
        return BusyTable(self.aws.dynamodb(), self.args.table, keys=keys)

    def _caller(self) -> tuple[str, str]:
        """(account, partition) of this command's credentials (GetCallerIdentity needs no permission)."""
        if self._identity is None:
            try:
                arn = str(self.aws.sts().get_caller_identity()["Arn"])
            except (ClientError, BotoCoreError) as error:
                raise CliError(
                    f"the isolated key scheme keys items by instance ARN, and this command could not learn "
                    f"its account ({one_line(str(error), 120)}): set {Env.ACCOUNT_ID} and {Env.PARTITION}, "
                    f"or {Env.KEY_SCHEME}={KEY_SCHEME_LEGACY} for a legacy table",
                ) from error
            parts = arn.split(":")
            self._identity = (parts[4], parts[1]) if len(parts) > 4 else ("", "")
        return self._identity


# --- errors and output --------------------------------------------------------------------------------
def explain(error: BaseException, args: argparse.Namespace) -> tuple[int, str]:
    """(exit code, one line) for an error, looking through the adapters' wrapping exceptions."""
    if isinstance(error, CliError):
        return error.code, str(error)
    if isinstance(error, ConfigError):
        return EXIT_USAGE, str(error)
    region = (
        getattr(args, "region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    )
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, NoCredentialsError | PartialCredentialsError):
            return EXIT_USAGE, (
                "no AWS credentials found: set AWS_PROFILE or pass --profile (after `aws sso login`), "
                "or run where an instance role is available"
            )
        if isinstance(seen, NoRegionError):
            return EXIT_USAGE, "no AWS region: pass --region or set AWS_REGION"
        if isinstance(seen, ProfileNotFound):
            profile = getattr(args, "profile", None) or os.environ.get("AWS_PROFILE")
            return EXIT_USAGE, f"AWS profile {profile!r} not found"
        if isinstance(seen, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
            return EXIT_ERROR, f"cannot reach AWS: {seen}"
        if isinstance(seen, ClientError):
            info = seen.response.get("Error", {})
            code, text = str(info.get("Code", "")), str(info.get("Message", ""))
            operation = seen.operation_name
            if code == "ResourceNotFoundException" and operation in _TABLE_OPERATIONS:
                return EXIT_USAGE, f"table {getattr(args, 'table', '?')!r} not found in {region or '?'}"
            if code in _CREDENTIAL_CODES:
                return EXIT_USAGE, f"AWS rejected the credentials ({code}): {text}"
            if code in _ACCESS_CODES:
                return EXIT_USAGE, f"access denied for {operation}: {text}"
            return EXIT_ERROR, f"AWS {operation} failed: {code}: {one_line(text)}"
        if isinstance(seen, ResponseParserError):
            # A proxy's or a wrong endpoint's HTML page: say so, never print the page.
            head, _, body = str(seen).partition("\n")
            got = f": {one_line(body)}" if body.strip() else ""
            return EXIT_ERROR, one_line(f"the endpoint's answer is not AWS's: {head.rstrip(': ')}{got}")
        if isinstance(seen, BotoCoreError):
            return EXIT_ERROR, f"AWS call failed: {seen}"
        seen = seen.__cause__
    if isinstance(error, RuntimeError) and str(error):  # the adapters' *UnavailableError
        return EXIT_ERROR, str(error)
    return EXIT_ERROR, f"unexpected error: {type(error).__name__}: {error}"


MAX_ERROR_TEXT = 300
_LIBRARY_PREFIX = "busy_guard: "


def one_line(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """An error text as one bounded line: an HTML error page, a multi-line message, a huge body."""
    if text.lstrip().startswith(("<", "b'<", 'b"<')) and "html" in text[:200].lower():
        title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        text = f"an HTML page ({title.group(1).strip() if title else 'no title'})"
    flat = " ".join(text.replace("\\n", " ").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def warn(command: str, message: str) -> None:
    print(f"{PROG} {command}: warning: {message}", file=sys.stderr)


class _CliLogFormat(logging.Formatter):
    """The library's log lines as the CLI's own: ``busy-guard run: warning: ...``, one prefix."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().removeprefix(_LIBRARY_PREFIX)
        return f"{PROG} {self.command}: {record.levelname.lower()}: {message}"


def configure_logging(debug: bool, command: str = "") -> None:
    """The writer's warnings ("runs without a lease") go to stderr as the CLI's own warnings. Left
    alone when the host program (pytest, an embedding application) has configured logging itself."""
    package = logging.getLogger("busy_guard")
    if logging.getLogger().handlers or package.handlers:
        return
    package.setLevel(logging.DEBUG if debug else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliLogFormat(command))
    package.addHandler(handler)
    if debug:
        botocore = logging.getLogger("botocore")
        botocore.setLevel(logging.DEBUG)
        botocore.addHandler(handler)


def duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h07m``, ``2d04h``."""
    total = round(abs(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"
