"""Parallel branches as steps of the parent workflow, numbered in a canonical order.

DBOS numbers a workflow's operations in the order they start and, on replay, expects the
same operation name at each number. Branches that run concurrently inside one workflow
would take their numbers in whatever order their steps happen to start. A branch whose
operations are known from the IR alone (a sequence of fn nodes, simple agents and
transforms) avoids that: before any branch runs, the parallel node draws every number
the branches will need with ``DBOS.reserve_step()``, branch by branch in branch order,
and each branch runs its steps at its own numbers. Which number carries which step is
then a function of the IR and of the number the parallel node started at, never of
timing, so a replay after a crash finds every recorded step at the number it expects.

A branch that fails leaves its unused numbers as gaps, which DBOS allows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from dbos import DBOS

from ..errors import DurapipeError
from ..ir import Agent, Fn, Limit, Node, Seq, Transform
from ..retry import policy_of

# The reservations the current branch (an asyncio task) still has to run, in order.
_queue: ContextVar[list[Any] | None] = ContextVar("durapipe_reserved_steps", default=None)


def static_ops(node: Node) -> int | None:
    """How many DBOS operations ``node`` starts, when the IR alone decides it; else None.

    Only nodes that run their operations one after another qualify: fn (one step), a
    transform (none), an agent without tools or output schema (one model turn), and
    sequences of those. Sequence hooks start operations only for dispatched tasks, which
    such a sequence cannot hold.
    """
    if isinstance(node, Transform):
        return 0
    if policy_of(node) is not None:
        return None  # how many attempts it takes is known only when it runs
    if isinstance(node, Fn):
        return 1
    if isinstance(node, Agent):
        return 1 if not node.tool_fns and node.output_model is None else None
    if isinstance(node, Limit):  # waits for a slot, but starts no DBOS operation
        return static_ops(node.body)
    if isinstance(node, Seq):
        total = 0
        for child in node.nodes:
            n = static_ops(child)
            if n is None:
                return None
            total += n
        return total
    return None


def reserve(count: int) -> list[Any]:
    """Draw ``count`` step numbers of the running workflow now, in order."""
    return [DBOS.reserve_step() for _ in range(count)]


@contextmanager
def running_at(reservations: list[Any]) -> Iterator[None]:
    """Make the steps run inside this block (one asyncio task) use ``reservations``."""
    queue = list(reservations)
    token = _queue.set(queue)
    try:
        yield
    finally:
        _queue.reset(token)


def reserving() -> bool:
    """True inside a branch that runs its steps at reserved numbers."""
    return _queue.get() is not None


def next_reservation(where: str) -> Any | None:
    """The reservation the next step of this branch runs at, or None outside a branch."""
    queue = _queue.get()
    if queue is None:
        return None
    if not queue:
        raise DurapipeError(
            f"node {where}: this parallel branch started more durable steps than its shape "
            "allows (an agent without tools asked for a tool?); it cannot be replayed "
            "deterministically", node=where,
        )
    return queue.pop(0)


def single_op(node: Node) -> bool:
    """True when a node starts at most one DBOS operation, before it first suspends."""
    if isinstance(node, Transform):
        return True
    if policy_of(node) is not None:
        return False
    if isinstance(node, Fn):
        return True
    if isinstance(node, Agent):
        return not node.tool_fns and node.output_model is None
    if isinstance(node, Seq):
        ops = [c for c in node.nodes if not isinstance(c, Transform)]
        return len(ops) <= 1 and all(single_op(c) for c in ops)
    return False
