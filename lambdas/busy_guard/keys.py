"""How an instance's item is keyed: by its ARN (isolated) or by its bare id (legacy).

Pure: no I/O, no boto3. The writer, the guard and the CLI all key items through one ``InstanceKeys``,
so the guard's draining mark lands on the very item a writer's begin is conditioned on.

Why ARNs: IAM can compare a request's partition key with ``${ec2:SourceInstanceARN}``, the ARN of the
instance whose instance-profile credentials signed it (``dynamodb:LeadingKeys``; IAM's global
condition keys, "ec2:SourceInstanceArn"). Nothing in a request names a bare instance id, so items
keyed by bare ids can't be kept apart by IAM: that is the replaced system's hole, kept readable only
as the ``legacy`` scheme and as the isolated scheme's companion items (``legacy_key``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from busy_guard.settings import (
    DEFAULT_PARTITION,
    INSTANCE_ARN_PATTERN,
    INSTANCE_ID_PATTERN,
    KEY_SCHEME_ISOLATED,
    KEY_SCHEME_LEGACY,
    KEY_SCHEMES,
)

_ARN = re.compile(INSTANCE_ARN_PATTERN)
_ID = re.compile(INSTANCE_ID_PATTERN)
_PARTITION = re.compile(r"^aws[a-z-]*$")
_REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+$")
_ACCOUNT = re.compile(r"^\d{12}$")


def instance_arn(*, partition: str, region: str, account: str, instance_id: str) -> str:
    """``arn:PARTITION:ec2:REGION:ACCOUNT:instance/ID``; ValueError naming the part that is wrong."""
    for name, value, pattern in (
        ("partition", partition, _PARTITION),
        ("region", region, _REGION),
        ("account", account, _ACCOUNT),
        ("instance id", instance_id, _ID),
    ):
        if pattern.fullmatch(value) is None:
            raise ValueError(f"not an EC2 instance ARN: {name} {value[:64]!r} is malformed")
    return f"arn:{partition}:ec2:{region}:{account}:instance/{instance_id}"


def parse_instance_arn(value: str) -> tuple[str, str] | None:
    """(ARN prefix up to ``instance/``, instance id) of an EC2 instance ARN; None for anything else."""
    match = _ARN.fullmatch(value)
    if match is None:
        return None
    instance_id = match["instance_id"]
    return value[: -len(instance_id)], instance_id


def instance_id_of(key: str) -> str:
    """The instance id an item's key names: the ARN's last part, or the key itself (a bare id, or
    junk that callers reject by ``INSTANCE_ID_PATTERN``)."""
    parsed = parse_instance_arn(key)
    return parsed[1] if parsed is not None else key


def is_bare_id(key: str) -> bool:
    """Whether ``key`` is a bare instance id: the legacy scheme's key, and the isolated one's companion."""
    return _ID.fullmatch(key) is not None


@dataclass(frozen=True)
class InstanceKeys:
    """The key scheme of one table. ``arn_prefix`` is ``arn:PARTITION:ec2:REGION:ACCOUNT:instance/``
    (isolated only); ``read_legacy`` also reads the bare-id item as a companion (isolated only)."""

    scheme: str = KEY_SCHEME_LEGACY
    arn_prefix: str = ""
    read_legacy: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in KEY_SCHEMES:
            raise ValueError(f"key scheme must be one of {KEY_SCHEMES}, not {self.scheme!r}")
        if self.isolated and parse_instance_arn(self.arn_prefix + "i-00000000") is None:
            raise ValueError(f"the isolated key scheme needs an instance ARN prefix, not {self.arn_prefix!r}")
        if not self.isolated and (self.arn_prefix or self.read_legacy):
            raise ValueError("the legacy key scheme keys items by bare ids: no ARN prefix, no companion")

    @classmethod
    def isolated_keys(
        cls, *, account: str, region: str, partition: str = DEFAULT_PARTITION, read_legacy: bool = True
    ) -> InstanceKeys:
        prefix = instance_arn(partition=partition, region=region, account=account, instance_id="i-00000000")
        return cls(KEY_SCHEME_ISOLATED, prefix.removesuffix("i-00000000"), read_legacy)

    @property
    def isolated(self) -> bool:
        return self.scheme == KEY_SCHEME_ISOLATED

    def key(self, instance_id: str) -> str:
        """The item the writers lease on and the guard marks."""
        return self.arn_prefix + instance_id if self.isolated else instance_id

    def legacy_key(self, instance_id: str) -> str | None:
        """The companion item whose work also counts (the bare id), or None when none is read."""
        return instance_id if self.read_legacy else None

    def owner(self, key: str) -> str | None:
        """The instance whose primary item ``key`` is, under this scheme; None for any other key
        (a companion, another account's or region's ARN, junk)."""
        instance_id = instance_id_of(key)
        return instance_id if is_bare_id(instance_id) and self.key(instance_id) == key else None

    def is_companion(self, key: str) -> bool:
        return self.read_legacy and is_bare_id(key)


LEGACY = InstanceKeys()
