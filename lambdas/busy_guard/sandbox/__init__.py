"""The local sandbox behind ``busy-guard demo`` and the tests: moto plus what moto lacks.

Sandbox only. Nothing outside this package imports it at import time (the guard Lambda never has
moto); import it explicitly, e.g. ``from busy_guard.sandbox import LifecycleHookEmulator``. This
``__init__`` imports only modules that need boto3/botocore, never moto.
"""

from busy_guard.sandbox.clock import ManualClock, ScaledClock
from busy_guard.sandbox.hooks import (
    ABANDON,
    CONTINUE,
    TERMINATING,
    ActionView,
    CallStats,
    Completion,
    LifecycleHookEmulator,
    TimelineEntry,
)

__all__ = [
    "ABANDON",
    "CONTINUE",
    "TERMINATING",
    "ActionView",
    "CallStats",
    "Completion",
    "LifecycleHookEmulator",
    "ManualClock",
    "ScaledClock",
    "TimelineEntry",
]
