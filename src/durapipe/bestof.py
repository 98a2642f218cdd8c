"""``best_of(n, node, score=)``: n candidates of a node at once, the best one kept.

The IR class and its builder; the engine's handler is ``engine/bestof.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import BuildError
from .ir import Node, as_node


@dataclass(frozen=True)
class BestOf(Node):
    """Run ``n`` candidates of ``body`` concurrently; keep the one ``score`` ranks highest."""

    kind: ClassVar[str] = "best_of"
    body: Node
    n: int
    score: Callable[[dict[str, Any]], Any]
    item_key: str = "candidate"

    def children(self) -> tuple[Node, ...]:
        return (self.body,)

    @property
    def label(self) -> str:
        return f"best_of({self.body.label})"


def best_of(n: int, node: Any, score: Callable[[dict[str, Any]], Any],
            item_key: str = "candidate") -> BestOf:
    """Run ``n`` candidates of ``node`` concurrently and keep the best by ``score``.

    Each candidate is a durable child workflow that sees its index (0 to n-1) in
    ``state[item_key]``. ``score(state)`` gets the state with a candidate's writes merged
    and returns a number; the highest wins (the lowest index on a tie; a failed candidate
    never wins; all failed is ``NodeFailed``). Only the winner's writes reach state. The
    candidates, their scores and the winner are recorded in one step (``<path>:best_of(...)``
    in ``durapipe.steps``), so a replay keeps the same winner and never runs a finished
    candidate again.

    >>> pipeline = best_of(3, Agent("writer").instruct("Title for {topic}"), score=len_of_title)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BuildError(f"best_of({n!r}, ...): n must be an int >= 1")
    if not callable(score) or isinstance(score, type):
        raise BuildError(f"best_of({n}, ...): score must be a function of the state returning a number")
    if not isinstance(item_key, str) or not item_key:
        raise BuildError(f"best_of({n}, ...): item_key must be a non-empty state key, got {item_key!r}")
    return BestOf(as_node(node, f"best_of({n}) node"), n, score, item_key)


__all__ = ["BestOf", "best_of"]
