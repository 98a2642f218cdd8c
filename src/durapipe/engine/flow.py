"""Handlers for goal-driven flows: each chosen step starts as soon as its needs are in state.

Every chosen step runs as a child workflow with the stable id ``<root>/<path>.<i>:<step>``.
The flow itself is one sequential loop, so its DBOS operations start in an order that does
not depend on timing:

1. start every step whose needs are now in state, in plan order (``start_child``);
2. ``DBOS.wait_first_async`` over the running children: a recorded step whose output is
   the id of a finished child, so replay after a crash sees the same "what finished next";
3. ``DBOS.get_result_async`` of that child (recorded), merge its writes, go to 1.

This is cheaper than ``DBOS.asyncio_wait`` over ``get_result`` futures: one query per poll
covers every running child (``get_result`` polls each child once per second), and no
operation is started from a concurrent task, so the numbering cannot depend on timing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dbos import DBOS

from ..errors import DurapipeError, NodeFailed, NodeTimeout, PlanError, StateError
from ..ir import Agent, Fn
from ..planner import Flow, PlannedStep, Step, at_path
from ..retry import from_retries
from ..state import State
from . import lifecycle
from .children import await_child
from .context import RunContext, node_error
from .handoff import Handoff
from .retry import run_attempts
from .taskgroup import with_cancelled

POLL_SECONDS = 0.05


def _renamed(exc: BaseException, step: Step, path: str) -> BaseException:
    """The same error class, its message prefixed with the step's name."""
    if not isinstance(exc, DurapipeError):
        return exc
    if exc.data.get("step") == step.name:
        return exc
    data: dict[str, Any] = {**exc.data, "step": step.name, "step_path": path}
    return type(exc)(f"step {step.name!r} ({path}) failed: {exc.message}", **data)


async def run_flow_step(ctx: RunContext, node: Step, path: str, state: State) -> State:
    body = f"{path}.0"
    # Fn and Agent carry the step's policy themselves (Step puts it on them); any other node
    # is re-run here under it: each attempt at its own mark, each failure recorded (retry.py).
    policy = None if isinstance(node.node, (Fn, Agent)) else (node.retry or from_retries(node.retries))
    try:
        if policy is not None:
            done = await run_attempts(ctx, policy, body, node.node.label,
                                      lambda where: ctx.execute(node.node, where, state))
        else:
            done = await ctx.execute(node.node, body, state)
    except (NodeFailed, NodeTimeout) as exc:
        raise _renamed(exc, node, path) from exc
    except Exception as exc:
        raise _renamed(node_error(exc, f"{body}:{node.node.label}"), node, path) from exc
    return _check_outputs(node, path, done)


def _check_outputs(node: Step, path: str, updates: State) -> State:
    missing = [k for k in node.outputs if k not in updates]
    if missing:
        raise StateError(
            f"step {node.name!r} ({path}) finished without writing its declared output "
            f"{missing[0]!r} (it wrote: {sorted(updates)}); return it from the step or remove "
            "it from outputs=[...]",
            step=node.name, key=missing[0], node=path,
        )
    return updates


async def run_flow(ctx: RunContext, node: Flow, path: str, state: State) -> State:
    try:
        plan = node.plan(inputs=state)
    except PlanError as exc:
        raise at_path(exc, path) from None
    # Each step starts from the flow's entry state plus what the flow wrote since: the entry
    # state is handed over once (handoff.py), the writes beside it.
    handoff = Handoff(path, state)
    state = dict(state)
    updates: State = {}
    waiting = list(plan.steps)
    running: dict[str, tuple[PlannedStep, Any]] = {}  # child id -> (step, handle)
    while waiting or running:
        for planned in [p for p in waiting if all(k in state for k in p.needs)]:
            waiting.remove(planned)
            step = node.steps[planned.index]
            handle = await ctx.start_child(step, f"{path}.{planned.index}",
                                           await handoff.input(step, updates))
            running[handle.workflow_id] = (planned, handle)
        if not running:
            stuck = waiting[0]
            raise StateError(
                f"flow {path}: step {stuck.name!r} can never start: its needs "
                f"{[k for k in stuck.needs if k not in state]} are not in state",
                node=path, step=stuck.name,
            )
        first = await DBOS.wait_first_async([h for _, h in running.values()],
                                            polling_interval_sec=POLL_SECONDS)
        planned, done = running.pop(first.workflow_id)
        try:
            out: State = await await_child(done) or {}
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise  # this flow is cancelled or its app stops: nothing to record here
            error = node_error(exc, f"{path}.{planned.index}:{planned.name}")
            if running:  # the flow failed: stop the steps still in flight
                await DBOS.cancel_workflows_async(list(running), cancel_children=True)
                lifecycle.cancel_local(*running)
                error = with_cancelled(
                    error, [f"{path}.{p.index}:{p.name}" for p, _ in running.values()])
            raise error from exc
        state.update(out)
        updates.update(out)
    return updates
