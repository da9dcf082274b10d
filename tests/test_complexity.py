"""No block of the guard Lambda is hard to follow: every function and method of ``guard/`` ranks
A-C on radon's cyclomatic complexity (D starts at 21 branches). The protocol's branching lives in
the pure planner, split by the step whose answer it handles."""

from __future__ import annotations

from pathlib import Path

from radon.complexity import cc_rank, cc_visit

GUARD = Path(__file__).resolve().parents[1] / "lambdas" / "busy_guard" / "guard"
EXECUTOR = GUARD / "reconcile.py"


def blocks() -> list[tuple[str, str, int]]:
    found = []
    for path in sorted(GUARD.glob("*.py")):
        for block in cc_visit(path.read_text()):
            found.append(
                (f"{path.name}:{block.lineno} {block.fullname}", cc_rank(block.complexity), block.complexity)
            )
    return found


def test_no_block_of_the_guard_ranks_d_or_worse() -> None:
    found = blocks()
    assert len(found) > 50  # the whole package was read
    worst = [entry for entry in found if entry[1] >= "D"]
    assert worst == [], worst


def test_the_executor_stays_short() -> None:
    """``Guard`` only runs steps: the protocol is the planner's."""
    lines = [line for line in EXECUTOR.read_text().splitlines() if line.strip()]
    assert len(lines) < 260, len(lines)
