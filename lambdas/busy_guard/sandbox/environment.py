"""The sandbox's process environment: fake credentials, and nothing of the developer's AWS setup.

Kept apart from ``world`` (which imports the guard, Powertools and the X-Ray SDK) because those
imports already read the AWS configuration: the demo enters this environment before importing them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

REGION = "us-east-1"

# Local runs never talk to AWS: fake credentials, no profile, config file, endpoint or IMDS of the
# developer's, and Powertools without an X-Ray daemon.
_SANDBOX_ENV = {
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "POWERTOOLS_TRACE_DISABLED": "true",
    # moto's default AMI catalogue costs seconds to load and serialize; one example AMI is enough.
    "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
    "POWERTOOLS_SERVICE_NAME": "busy-guard",
    "POWERTOOLS_METRICS_NAMESPACE": "BusyGuard",
}


# Variables that would point boto3 at a real account, a profile or an endpoint.
_AWS_VARIABLES_TO_DROP = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_SECURITY_TOKEN")


def _dropped(name: str) -> bool:
    return name in _AWS_VARIABLES_TO_DROP or name.startswith("AWS_ENDPOINT_URL_")


@contextmanager
def sandbox_environment(values: Mapping[str, str] | None = None) -> Iterator[None]:
    """The sandbox's environment (plus ``values``) for the duration; the caller's is restored after.

    Nothing of the developer's AWS setup leaks in: a profile that does not exist here, or an
    endpoint override, would otherwise break boto3 or send calls somewhere real."""
    wanted = {**_SANDBOX_ENV, **(values or {})}
    saved = {name: os.environ.get(name) for name in [*wanted, *filter(_dropped, os.environ)]}
    for name in list(os.environ):
        if _dropped(name):
            del os.environ[name]
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
