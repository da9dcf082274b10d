#!/usr/bin/env python3
"""CDK entry point (``cdk.json``: ``python3 infra/app.py``). Configuration comes from CDK context; an
invalid configuration stops synth with one message per problem, each naming its key."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from busy_guard_infra.application import build_app
from busy_guard_infra.config import ConfigError


def main(context: Mapping[str, Any] | None = None) -> int:
    try:
        app, _ = build_app(context)
    except ConfigError as error:
        print(f"busy-guard: {error}", file=sys.stderr)
        return 1
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
