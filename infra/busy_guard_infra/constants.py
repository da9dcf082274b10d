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

# Powertools for AWS Lambda (Python) v3, the public layer built for Python 3.13 on arm64.
# Version 27 is the one the project's own install docs pin (docs/index.md, updated from 18 to 27 in
# aws-powertools/powertools-lambda-python PR #7757). Newer versions exist; bump deliberately, after
# running the guard's tests against the matching aws-lambda-powertools release.
POWERTOOLS_LAYER_ACCOUNT: Final = "017000801446"
POWERTOOLS_LAYER_NAME: Final = "AWSLambdaPowertoolsPythonV3-python313-arm64"
POWERTOOLS_LAYER_VERSION: Final = 27

SERVICE_NAME: Final = "busy-guard"
METRICS_NAMESPACE: Final = "BusyGuard"
MAX_WAIT_EXCEEDED_METRIC: Final = "MaxWaitExceeded"

TERMINATE_EVENT_SOURCE: Final = "aws.autoscaling"
TERMINATE_EVENT_DETAIL_TYPE: Final = "EC2 Instance-terminate Lifecycle Action"
TERMINATING_TRANSITION: Final = "autoscaling:EC2_INSTANCE_TERMINATING"


# Every environment variable the guard Lambda reads is named once, in busy_guard.settings.
Env = settings.Env
