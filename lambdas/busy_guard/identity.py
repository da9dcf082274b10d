"""Who and when this process is: the EC2 instance id and the boot time of this machine.

Nothing here touches the network at import time. The instance id comes from an explicit argument,
else ``BUSY_GUARD_INSTANCE_ID``, else IMDSv2 (a token ``PUT``, then ``meta-data/instance-id``), with a
short timeout; the answer is cached for the life of the process, a failure for five minutes (so a
laptop does not pay the timeout on every operation, and a transient IMDS hiccup on EC2 heals).
Whatever the source, the id is validated (``validate_instance_id``) before anything is written with it.
Under the isolated key scheme the item's key is the instance ARN (``resolve_key``): an ARN argument,
else ``BUSY_GUARD_INSTANCE_ARN``, else IMDS's identity document and ``services/partition``.
IMDS is reached where botocore reaches it for the instance's own credentials (``imds_endpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import botocore.session
import botocore.utils
from botocore.exceptions import BotoCoreError

from busy_guard.keys import instance_arn, parse_instance_arn
from busy_guard.settings import INSTANCE_ID_PATTERN, KEY_SCHEME_LEGACY, Env

logger = logging.getLogger("busy_guard.identity")

ENV_INSTANCE_ID = Env.INSTANCE_ID
ENV_INSTANCE_ARN = Env.INSTANCE_ARN
# What botocore honours for its own IMDS calls, so one setting covers both. The endpoint and its mode
# are botocore config variables: the environment, else the profile's ~/.aws/config
# (ec2_metadata_service_endpoint, ec2_metadata_service_endpoint_mode, imds_use_ipv6).
ENV_IMDS_ENDPOINT = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
ENV_IMDS_ENDPOINT_MODE = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"
ENV_IMDS_DISABLED = "AWS_EC2_METADATA_DISABLED"  # botocore reads this one from the environment only
# botocore's own addresses per endpoint mode: http://169.254.169.254/ and http://[fd00:ec2::254]/.
IMDS_ENDPOINTS = {"ipv4": botocore.utils.METADATA_BASE_URL, "ipv6": botocore.utils.METADATA_BASE_URL_IPv6}
IMDS_TIMEOUT = 1.0
IMDS_FAILURE_TTL = 300.0
_TOKEN_TTL_SECONDS = "21600"  # noqa: S105 - a lifetime in seconds, not a secret

_INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)
SOURCE_ARGUMENT = "the instance_id argument"
SOURCE_IMDS = "IMDS meta-data/instance-id"


class InvalidInstanceIdError(ValueError):
    """An instance id that is not ``i-`` and 8 or 17 lowercase hex digits (or an instance ARN that is
    not one); says where it came from."""

    def __init__(
        self, value: str, source: str, expected: str = "an EC2 instance id (like i-0123456789abcdef0)"
    ) -> None:
        self.value = value
        self.source = source
        # Cut: a bad value may be any size (an env var, a corrupt IMDS answer).
        shown = value if len(value) <= 64 else value[:64] + "..."
        self.reason = f"not {expected}: {shown!r}"
        super().__init__(f"{source}: {self.reason}")


def validate_instance_id(value: str, source: str) -> str:
    """``value`` if it is an EC2 instance id, else ``InvalidInstanceIdError`` naming ``source``.

    The one check for every source (argument, environment, IMDS, the CLI's options), applied before
    an id keys any write: a typo or a hostname must not create an item the guard never looks at."""
    if _INSTANCE_ID.fullmatch(value) is None:
        raise InvalidInstanceIdError(value, source)
    return value


def validate_instance_arn(value: str, source: str) -> tuple[str, str]:
    """(ARN prefix, instance id) of an EC2 instance ARN, else ``InvalidInstanceIdError`` naming ``source``."""
    parsed = parse_instance_arn(value)
    if parsed is None:
        raise InvalidInstanceIdError(
            value, source, "an EC2 instance ARN (arn:aws:ec2:REGION:ACCOUNT:instance/ID)"
        )
    return parsed


_lock = threading.Lock()
_imds_answers: dict[str, str] = {}
_imds_region: str | None = None
_imds_failed_at: float | None = None
_boot_time: float | None = None


def resolve_instance_id(explicit: str | None = None) -> str:
    """The instance id to lease on; ``""`` when none can be found (the caller then takes no lease).

    Raises ``InvalidInstanceIdError`` for a malformed explicit or ``BUSY_GUARD_INSTANCE_ID`` value;
    a malformed IMDS answer counts as no answer (logged, remembered like any IMDS failure)."""
    if explicit is not None:
        explicit = explicit.strip()
        return explicit and validate_instance_id(explicit, SOURCE_ARGUMENT)
    from_env = os.environ.get(ENV_INSTANCE_ID, "").strip()
    if from_env:
        return validate_instance_id(from_env, ENV_INSTANCE_ID)
    return imds_instance_id()


def resolve_key(explicit: str | None, scheme: str) -> tuple[str, str]:
    """(instance id, the key of its item) to lease on; ``("", "")`` when no instance id is found, and
    ``(id, "")`` when the isolated scheme's ARN can't be learnt (the caller then takes no lease).

    The isolated scheme keys by the instance ARN: ``explicit`` may be the ARN itself, else
    ``BUSY_GUARD_INSTANCE_ARN`` names it, else IMDS does (the identity document's account and region,
    and ``services/partition``). Raises ``InvalidInstanceIdError`` for a malformed explicit value,
    ``BUSY_GUARD_INSTANCE_ID`` or ``BUSY_GUARD_INSTANCE_ARN``, and for an ARN of another instance
    than the id."""
    arn: str | None = None
    from_env = os.environ.get(ENV_INSTANCE_ARN, "").strip()
    if explicit is not None and explicit.strip().startswith("arn:"):
        arn = explicit.strip()
        instance_id = validate_instance_arn(arn, SOURCE_ARGUMENT)[1]
    elif explicit is None and from_env and not os.environ.get(ENV_INSTANCE_ID, "").strip():
        arn = from_env
        instance_id = validate_instance_arn(arn, ENV_INSTANCE_ARN)[1]
    else:
        instance_id = resolve_instance_id(explicit)
    if not instance_id or scheme == KEY_SCHEME_LEGACY:
        return instance_id, instance_id
    if arn is None and from_env:
        arn = from_env
        named = validate_instance_arn(from_env, ENV_INSTANCE_ARN)[1]
        if named != instance_id:
            raise InvalidInstanceIdError(from_env, f"{ENV_INSTANCE_ARN} (names {named}, not {instance_id})")
    if arn is None:
        prefix = imds_arn_prefix()
        arn = prefix + instance_id if prefix else ""
    return instance_id, arn


def imds_instance_id() -> str:
    """This EC2 instance's id from IMDSv2, cached; ``""`` off EC2 or when IMDS does not answer."""
    return _cached_imds("instance id", _fetch_instance_id)


def _cached_imds(what: str, fetch: Callable[[], str]) -> str:
    """One answer of IMDS's, fetched once per process; ``""`` when IMDS is disabled or does not answer.
    A failure is remembered for ``IMDS_FAILURE_TTL`` (for every answer: IMDS is down, not one path)."""
    global _imds_failed_at  # noqa: PLW0603 - a process-wide cache is the point
    if os.environ.get(ENV_IMDS_DISABLED, "").strip().lower() == "true":
        return ""
    # Held during the fetch: concurrent first callers wait for one request instead of each
    # paying the timeout.
    with _lock:
        if what in _imds_answers:
            return _imds_answers[what]
        if _imds_failed_at is not None and time.monotonic() - _imds_failed_at < IMDS_FAILURE_TTL:
            return ""
        try:
            _imds_answers[what] = fetch()
            _imds_failed_at = None
            return _imds_answers[what]
        # URLError, timeouts and refusals are all OSError; a bad id, ARN, document or endpoint URL is a
        # ValueError (or a KeyError/TypeError of the document); an invalid endpoint mode or a missing
        # AWS_PROFILE is botocore's.
        except (OSError, ValueError, KeyError, TypeError, BotoCoreError) as err:
            _imds_failed_at = time.monotonic()
            logger.warning("busy_guard: no %s from IMDS (%s); operations run without a lease", what, err)
            return ""


def _fetch_instance_id() -> str:
    return validate_instance_id(_imds_get("meta-data/instance-id"), SOURCE_IMDS)


def imds_region() -> str | None:
    """This instance's region from IMDSv2 (``placement/region``), cached; None off EC2.

    boto3 does not read the region from IMDS, so an instance without ``AWS_REGION`` or a config
    file would otherwise fail every call with NoRegionError."""
    global _imds_region  # noqa: PLW0603 - a process-wide cache is the point
    if os.environ.get(ENV_IMDS_DISABLED, "").strip().lower() == "true":
        return None
    with _lock:
        if _imds_region is None:
            try:
                _imds_region = _imds_get("meta-data/placement/region")
            except (OSError, ValueError, BotoCoreError) as err:
                logger.warning("busy_guard: no region configured and none from IMDS (%s)", err)
                _imds_region = ""
        return _imds_region or None


def imds_arn_prefix() -> str:
    """``arn:PARTITION:ec2:REGION:ACCOUNT:instance/`` of this instance, from IMDSv2 (the identity
    document's ``accountId`` and ``region``, and ``meta-data/services/partition``), cached; ``""`` off
    EC2 or when IMDS does not answer."""
    return _cached_imds("instance ARN", _fetch_arn_prefix)


def _fetch_arn_prefix() -> str:
    document = json.loads(_imds_get("dynamic/instance-identity/document"))
    instance_id = str(document["instanceId"])
    arn = instance_arn(
        partition=_imds_get("meta-data/services/partition"),
        region=str(document["region"]),
        account=str(document["accountId"]),
        instance_id=instance_id,
    )
    return arn.removesuffix(instance_id)


def imds_endpoint() -> str:
    """The IMDS base URL, chosen as botocore chooses it for the instance's credentials: a custom
    ``ec2_metadata_service_endpoint`` wins; else the endpoint mode (``ec2_metadata_service_endpoint_mode``,
    any case, else ``imds_use_ipv6``) picks the IPv6 or the IPv4 address. Each is read from the
    environment, else from the profile's config file, by botocore's own resolution
    (``botocore.utils.resolve_imds_endpoint_mode``, which also rejects an unknown mode)."""
    session = botocore.session.Session()
    custom = str(session.get_config_variable("ec2_metadata_service_endpoint") or "").strip()
    if custom:
        if not custom.startswith(("http://", "https://")):
            raise ValueError(f"{ENV_IMDS_ENDPOINT} must be an http(s) URL")
        return custom
    return IMDS_ENDPOINTS[botocore.utils.resolve_imds_endpoint_mode(session)]


def _imds_get(path: str) -> str:
    """One IMDSv2 read: a session token (PUT), then the path."""
    base = imds_endpoint().rstrip("/")
    # IMDS is link-local: an HTTP(S)_PROXY from the environment must never see these requests.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    # The scheme was checked above, so S310's file:/custom-scheme concern does not apply.
    token_request = urllib.request.Request(  # noqa: S310
        f"{base}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": _TOKEN_TTL_SECONDS},
    )
    with opener.open(token_request, timeout=IMDS_TIMEOUT) as response:
        token = bytes(response.read()).decode("ascii").strip()
    request = urllib.request.Request(  # noqa: S310
        f"{base}/latest/{path}", headers={"X-aws-ec2-metadata-token": token}
    )
    with opener.open(request, timeout=IMDS_TIMEOUT) as response:
        return bytes(response.read()).decode("ascii").strip()


def boot_time() -> float:
    """Epoch seconds at which this machine booted, computed once; 0.0 when unknown.

    Begin compares it with a ``released`` mark: a mark from before this boot belongs to an earlier
    life of a warm-pool instance and must not refuse new leases. 0.0 makes every mark "this boot",
    which errs on the side of refusing.
    """
    global _boot_time  # noqa: PLW0603
    if _boot_time is None:
        _boot_time = _read_boot_time()
    return _boot_time


def _read_boot_time() -> float:
    try:
        with open("/proc/uptime", encoding="ascii") as uptime:
            seconds = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return time.time() - seconds


def reset_caches() -> None:
    """Forget the cached instance id, ARN, region and boot time (tests)."""
    global _imds_failed_at, _boot_time, _imds_region  # noqa: PLW0603
    with _lock:
        _imds_answers.clear()
        _imds_region = None
        _imds_failed_at = None
        _boot_time = None
