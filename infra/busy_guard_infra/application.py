"""Builds the CDK app from context: what ``infra/app.py`` runs and what the tests build."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aws_cdk import App, Aspects
from cdk_nag import AwsSolutionsChecks, ServerlessChecks

from busy_guard_infra.config import BusyGuardConfig
from busy_guard_infra.stack import BusyGuardStack


def add_nag_packs(app: App) -> None:
    """cdk-nag's AwsSolutions and Serverless packs; every accepted finding is suppressed with a reason
    where it arises (the constructs)."""
    Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
    Aspects.of(app).add(ServerlessChecks(verbose=True))


def build_app(
    context: Mapping[str, Any] | None = None, *, outdir: str | None = None
) -> tuple[App, BusyGuardStack]:
    """The app with its one stack and the AwsSolutions and Serverless checks. Raises ``ConfigError``
    before building anything when the context is invalid.

    ``context`` adds to (and overrides) what the CDK CLI passes in, so tests can give the ``cdk.json``
    context plus overrides, as ``cdk synth -c`` would.
    """
    app = App(context=dict(context or {}), outdir=outdir)
    config = BusyGuardConfig.from_context(app.node.try_get_context)
    stack = BusyGuardStack(app, config.stack_name, config=config)
    add_nag_packs(app)
    return app, stack
