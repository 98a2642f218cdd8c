"""What a child workflow receives as its input state: what it reads, never a copy per child.

A map item with a multi-step body, a parallel branch that runs as a child workflow, a
dispatched task, a race branch, a best_of candidate, a timeout's body and a Flow's step each
start a child workflow whose DBOS input is the state it starts from.
Copying the whole state into every child made a map over a list in state write O(N²)
bytes. A :class:`Handoff` (one per map, fan-out or dispatch node instance) decides per
child:

1. the IR knows what the child's subtree reads (agents' ``{key}`` templates, ``reads=`` of
   fn and transform, and composites of those: :func:`reads`): the child gets those keys;
2. else, a small state (at most ``SMALL`` bytes of JSON) is copied as before;
3. else, the parent records its state once, as the step ``<path>:state`` of its own
   workflow, and each child gets a reference to that row (``{REF_KEY: {"workflow": id,
   "step": n}}``) and reads it once when it starts (:func:`resolve`). The row is never
   written again, so a replay or a recovery of the child in any process reads the same
   state; a process reads each snapshot once for all its children.

Keys a child gets beside the state (a map's item, the keys a Flow wrote since it started)
are added in every case. A node that starts one child from a state (a timeout) copies it
rather than refer to it (``share=False``): the snapshot would cost the same bytes and a step
more. Without durapipe's own step writer (SQLite, or ``App(steps="dbos")``) the state is
copied, and so it is for a run recorded before its children were given references: where
the snapshot's step would be, its history holds the first child's start (the replay starts
the same children at the same step numbers, with copies).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from dbos import DBOS
from dbos._error import DBOSUnexpectedStepError

from ..errors import DurapipeError
from ..ir import (
    Agent,
    Fallback,
    Fn,
    Loop,
    MapOver,
    Node,
    Parallel,
    Race,
    Route,
    Seq,
    Sleep,
    Timeout,
    Transform,
)
from ..planner import Step
from ..state import State
from . import bounds, lifecycle
from . import steps as lean
from .current import active_step_log
from .reserve import reserving

REF_KEY = "durapipe:state_ref"
SMALL = 4096  # bytes of JSON: a state this small is cheaper to copy than to refer to
_CACHE_SIZE = 4


def reads(node: Node) -> frozenset[str] | None:
    """The state keys ``node``'s subtree reads, when the IR says; else None."""
    if isinstance(node, Agent):
        return frozenset(node.reads())
    if isinstance(node, (Fn, Transform)):
        return None if node.reads is None else frozenset(node.reads)
    if isinstance(node, Sleep):
        return frozenset()
    if isinstance(node, Step):  # a Flow's step: its node (needs= only orders the steps)
        return reads(node.node)
    if isinstance(node, (Seq, Parallel, Fallback, Race, Timeout)):
        return _union(node.children())
    if isinstance(node, Loop):
        return reads(node.body) if node.until is None else None
    if isinstance(node, MapOver):
        body = reads(node.body)
        return None if body is None else (body - {node.item_key}) | {node.items_key}
    if isinstance(node, Route) and isinstance(node.selector, str):
        found = _union(node.children())
        return None if found is None else found | {node.selector}
    return None


def _union(nodes: tuple[Node, ...]) -> frozenset[str] | None:
    out: set[str] = set()
    for child in nodes:
        found = reads(child)
        if found is None:
            return None
        out |= found
    return frozenset(out)


class Handoff:
    """The inputs of the children one node instance starts from ``state``."""

    def __init__(self, path: str, state: State) -> None:
        self.path, self.state = path, state
        self._small: bool | None = None
        self._ref: asyncio.Future[dict[str, Any] | None] | None = None

    async def input(self, node: Node, extra: Mapping[str, Any] | None = None,
                    share: bool = True) -> State:
        """The input state of a child workflow that runs ``node``; ``share=False`` for the
        only child started from this state (copied when the IR does not say what it reads)."""
        keys = reads(node)
        out: State
        if keys is not None:
            out = {k: self.state[k] for k in keys if k in self.state}
        elif not share or self.small():
            out = dict(self.state)
        else:
            ref = await self.reference()
            out = {REF_KEY: ref} if ref is not None else dict(self.state)
        if extra:
            out.update(extra)
        return out

    def small(self) -> bool:
        if self._small is None:
            try:
                self._small = len(json.dumps(self.state, default=str)) <= SMALL
            except (TypeError, ValueError):
                self._small = True  # the child's start reports what cannot be stored
        return self._small

    async def reference(self) -> dict[str, Any] | None:
        """The recorded snapshot of the state (recorded on first use), or None to copy."""
        if self._ref is None:
            self._ref = asyncio.ensure_future(_snapshot(self.path, self.state))
        return await self._ref


async def _snapshot(path: str, state: State) -> dict[str, Any] | None:
    log = active_step_log()
    if log is None or reserving():
        return None
    step = lean.take_step(None)
    if step is None:
        return None
    name = f"{path}:state"
    if log.must_check(step):  # a replay: is this number the snapshot in the history?
        try:
            if await bounds.to_thread(log.check, step, name) is not None:
                return {"workflow": step.workflow_id, "step": step.function_id}
        except DBOSUnexpectedStepError:
            # Recorded before children got references: copies, at the numbers recorded.
            if lean.give_back(step):
                return None
            raise
    if not lifecycle.step_started():
        await lifecycle.hold()  # the app is stopping: no new step starts
    try:
        snapshot = dict(state)

        async def body() -> State:
            return snapshot
        await lean.run_async(log, step, name, 0, body, lambda _: False)
    finally:
        lifecycle.step_done()
    return {"workflow": step.workflow_id, "step": step.function_id}


# (workflow id, step number) -> the state recorded there; rows never change once written.
_cache: OrderedDict[tuple[str, int], State] = OrderedDict()
_cache_lock = threading.Lock()


async def resolve(state: State) -> State:
    """A child's input state with a reference replaced by the state it refers to."""
    ref = state.get(REF_KEY) if isinstance(state, dict) else None
    if ref is None:
        return state
    key = (str(ref["workflow"]), int(ref["step"]))
    with _cache_lock:
        found = _cache.get(key)
    if found is None:
        # Not in the caller's DBOS context: this read is not an operation of the child.
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(bounds.executor(), _read, *key)
        with _cache_lock:
            _cache[key] = found
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    rest = {k: v for k, v in state.items() if k != REF_KEY}
    return {**found, **rest}


def _read(workflow_id: str, step: int) -> State:
    log = active_step_log()
    if log is not None:
        value = log.output(workflow_id, step)
    else:
        rows = [s for s in DBOS.list_workflow_steps(workflow_id) if s["function_id"] == step]
        value = rows[0]["output"] if rows else None
    if not isinstance(value, dict):
        raise DurapipeError(
            f"the state snapshot {workflow_id} step {step} that this child workflow starts "
            "from is missing (was the parent's history deleted?); fork the run from before "
            "the node that started it", workflow=workflow_id, step=step,
        )
    return value
