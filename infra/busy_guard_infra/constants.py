"""Names and paths shared by the constructs: the contract with the guard Lambda's code in ``lambdas/``."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from busy_guard import settings

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
LAMBDAS_DIR: Final = REPO_ROOT / "lambdas"
"""The Lambda code asset: the ``busy_guard`` package, without what only tests and the sandbox use."""

ASSET_EXCLUDES: Final = (
    "tests",
    "**/tests",
    "**/__pycache__",
    "**/*.pyc",
    "*.egg-info",
    "**/.mypy_cache",
    "**/.pytest_cache",
    "**/.hypothesis",
    "busy_guard/sandbox",
)

HANDLER: Final = "busy_guard.guard.handler.handler"

# The guard's third-party code (Powertools, pydantic, the X-Ray SDK), pinned in LAMBDA_REQUIREMENTS and
# shipped as the stack's own layer: Powertools' public layer has a different account and version number
# per region in GovCloud and its SSM parameters exist only in commercial regions (README, "Every
# partition and region"). `make lambda-deps` builds LAMBDA_DEPS_DIR from LAMBDA_REQUIREMENTS.
LAMBDA_REQUIREMENTS: Final = REPO_ROOT / "infra" / "lambda-requirements.txt"
LAMBDA_DEPS_DIR: Final = REPO_ROOT / "build" / "lambda-deps"
"""A layer's root: the packages are in ``python/``, which Lambda puts on ``sys.path``."""
LAMBDA_DEPS_EXCLUDES: Final = ("**/__pycache__", "**/*.pyc", "bin")

SERVICE_NAME: Final = "busy-guard"
METRICS_NAMESPACE: Final = "BusyGuard"
MAX_WAIT_EXCEEDED_METRIC: Final = "MaxWaitExceeded"

TERMINATE_EVENT_SOURCE: Final = "aws.autoscaling"
TERMINATE_EVENT_DETAIL_TYPE: Final = "EC2 Instance-terminate Lifecycle Action"
TERMINATING_TRANSITION: Final = "autoscaling:EC2_INSTANCE_TERMINATING"


# Every environment variable the guard Lambda reads is named once, in busy_guard.settings.
Env = settings.Env
