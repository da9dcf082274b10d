"""When the invocation must be finished: no AWS call, retries included, may start unless it can end
before then."""

from __future__ import annotations

import time
from collections.abc import Callable

from busy_guard import settings


class DeadlineExceededError(RuntimeError):
    """Not enough of the invocation's time is left for another AWS call; the next trigger goes on."""


class Deadline:
    """An instant on a monotonic clock (``None``: no deadline, for tests and the CLI)."""

    def __init__(self, at: float | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._at = at
        self._clock = clock

    @classmethod
    def after(cls, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock=clock)

    @classmethod
    def of_invocation(
        cls, remaining_millis: int | None, *, clock: Callable[[], float] = time.monotonic
    ) -> Deadline:
        """From Lambda's ``context.get_remaining_time_in_millis()``, else the configured timeout."""
        remaining = (
            remaining_millis / 1000 if remaining_millis is not None else settings.FUNCTION_TIMEOUT_SECONDS
        )
        return cls.after(remaining - settings.DEADLINE_MARGIN_SECONDS, clock=clock)

    def remaining(self) -> float:
        return float("inf") if self._at is None else self._at - self._clock()

    def allows(self, seconds: float) -> bool:
        return self.remaining() >= seconds

    def allows_call(self) -> bool:
        """Whether one more AWS call, with all of its retries, ends in time."""
        return self.allows(settings.aws_call_budget_seconds())

    def check_call(self, what: str) -> None:
        if not self.allows_call():
            raise DeadlineExceededError(
                f"{what}: {max(self.remaining(), 0):.1f}s left, one AWS call may take "
                f"{settings.aws_call_budget_seconds():.0f}s"
            )


NO_DEADLINE = Deadline()
