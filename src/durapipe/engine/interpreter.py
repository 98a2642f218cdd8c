"""The node table and the DBOS workflows that run every pipeline.

A run of pipeline P is ``durapipe.run:P(pipeline, version, state, path="0", root=None)``
(:func:`run_workflow`), its subtrees ``durapipe.run(...)`` with the same arguments; a dispatched
task is ``durapipe.task(pipeline, version, state, path, root, name)``. Each workflow looks
the pipeline up by name in the launched App (one it lacks is handed over to the processes
that have it, see ``engine/handover.py``), continues a run recorded by another shape
only when its history is unchanged up to where it stopped (else leaves it waiting for a
worker with its shape, see ``engine/versions.py``), and walks the IR with one handler per
node type, taken from :data:`HANDLERS`: the one place that says which code runs which
node kind. Handlers reach each other only through the context (``ctx.execute``), which
carries this table.

Paths of dynamic instances carry a mark: pass 2 of a loop body at ``0.3`` runs at
``0.3.0#2``, map item 5 at ``0.4.0#5``; :meth:`Registered.node_at` ignores the marks.

Child workflows are awaited with :func:`children.await_child`, which avoids DBOS's
one-second polling while keeping its recorded ``DBOS.getResult`` operation.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbos import DBOS

from ..bestof import BestOf
from ..errors import error_text
from ..ir import (
    Agent,
    Dispatch,
    Fallback,
    Fn,
    Gate,
    Join,
    Limit,
    Loop,
    MapOver,
    Node,
    Parallel,
    Patched,
    Race,
    Route,
    Seq,
    Sleep,
    Timeout,
    Transform,
    callable_name,
)
from ..planner import Flow, Step
from ..state import State
from . import (
    agent,
    basic,
    bestof,
    control,
    dispatch,
    events,
    flow,
    gates,
    handoff,
    handover,
    lifecycle,
    limits,
    patching,
    retry,
    versions,
)
from .context import Handler, Hook, RunContext, Table, finish, node_error, run_step
from .current import current_app
from .scope import DURAPIPE_WORKFLOWS, TASK_WORKFLOW, WORKFLOW_NAME, run_workflow_name

if TYPE_CHECKING:
    from .app import App
    from .runs import Registered

__all__ = ["DURAPIPE_WORKFLOWS", "HANDLERS", "TABLE", "TASK_WORKFLOW", "WORKFLOW_NAME",
           "run_pipeline", "run_task", "run_workflow"]

log = logging.getLogger("durapipe")

HANDLERS: dict[type[Node], Handler] = {
    Seq: basic.run_seq,
    Parallel: basic.run_parallel,
    Fn: retry.retrying(basic.run_fn),
    Transform: basic.run_transform_node,
    Sleep: basic.run_sleep,
    Agent: retry.retrying(agent.run_agent),
    Fallback: control.run_fallback,
    Loop: control.run_loop,
    Route: control.run_route,
    Race: control.run_race,
    Timeout: control.run_timeout,
    Limit: limits.run_limit,
    MapOver: control.run_map,
    BestOf: bestof.run_best_of,
    Dispatch: dispatch.run_dispatch,
    Join: dispatch.run_join,
    Gate: gates.run_gate,
    Patched: patching.run_patched,
    Step: flow.run_flow_step,
    Flow: flow.run_flow,
}
# Before each node of a sequence after the first: fold in the progress of pending tasks.
BETWEEN_HOOKS: tuple[Hook, ...] = (dispatch.refresh_progress,)
# When a workflow's node is done: join the tasks it left pending.
FINISH_HOOKS: tuple[Hook, ...] = (dispatch.auto_join,)


async def open_pipeline(pipeline: str, version: str, path: str = "0",
                        root: str | None = None) -> tuple[App, Registered]:
    """The launched App and the registered pipeline a workflow runs.

    A workflow recorded by another shape continues only when its history is unchanged up
    to where it stopped; otherwise it is left waiting for a worker with its shape
    (:func:`versions.reconcile`).
    """
    app = current_app()
    registered = app.registered(pipeline)
    if registered.version != version:
        await versions.reconcile(app, registered, version, path, root or DBOS.workflow_id or "")
    return app, registered


async def _hand_over_unknown(pipeline: str, version: str, root: str) -> None:
    """A workflow of a pipeline this process does not register (DBOS's internal queue,
    which every process of the app dequeues from, gave it here): hand it over to the
    processes with its shape before anything runs (see :mod:`.handover`)."""
    app = current_app()
    if pipeline not in app.pipelines:
        await handover.hand_over(app, pipeline, version, root)


@DBOS.workflow(name=WORKFLOW_NAME)
async def run_pipeline(
    pipeline: str, version: str, state: State, path: str = "0", root: str | None = None
) -> State:
    """A subtree of a run (and a run recorded before runs were named by pipeline)."""
    return await _run_pipeline(pipeline, version, state, path, root)


_RUN_WORKFLOWS: dict[str, Callable[..., Any]] = {}


def run_workflow(pipeline: str) -> Callable[..., Any]:
    """The DBOS workflow ``durapipe.run:<pipeline>`` that runs of ``pipeline`` start as.

    Registered when the pipeline is (before launch, so recovery finds it); one function
    per name in the process, shared by every App that registers a pipeline of that name
    (the body looks the pipeline up in the launched App, as :func:`run_pipeline` does).
    """
    name = run_workflow_name(pipeline)
    found = _RUN_WORKFLOWS.get(name)
    if found is None:
        async def run(pipeline: str, version: str, state: State, path: str = "0",
                      root: str | None = None) -> State:
            return await _run_pipeline(pipeline, version, state, path, root)
        run.__qualname__ = run.__name__ = f"run_{pipeline}"
        found = _RUN_WORKFLOWS[name] = DBOS.workflow(name=name)(run)
    return found


async def _run_pipeline(
    pipeline: str, version: str, state: State, path: str, root: str | None
) -> State:
    run_id = DBOS.workflow_id or ""
    await _hand_over_unknown(pipeline, version, root or run_id)
    with lifecycle.running(run_id):  # also while it waits for a worker with its shape
        async with events.streaming(root or run_id, path, pipeline):
            app, registered = await open_pipeline(pipeline, version, path, root or run_id)
            ctx = RunContext(app=app, pipeline=registered, root=root or run_id, table=TABLE,
                             tracer=app.tracing, recorded=version)
            node = registered.node_at(path)
            state = await handoff.resolve(state)

            async def body() -> State:
                try:
                    updates = await finish(ctx, path, state, await ctx.execute(node, path, state))
                except BaseException:
                    await ctx.settle(raise_errors=False)
                    raise
                await ctx.settle()
                if path == "0":
                    return {**state, **updates}
                return updates

            if ctx.tracer is not None:
                return await ctx.tracer.workflow(ctx, path, body)
            return await body()


@DBOS.workflow(name=TASK_WORKFLOW)
async def run_task(
    pipeline: str, version: str, state: State, path: str, root: str, name: str
) -> State:
    """One dispatched task: run its node, then its callback.

    The callbacks are steps in the tail of the task's own workflow: that runs them once per
    finished task (a recorded step is never re-run, also after a crash), in whichever
    worker runs the task, without the main pipeline waiting for them; and a join that
    returns has seen its tasks' callbacks done.
    """
    await _hand_over_unknown(pipeline, version, root)
    with lifecycle.running(DBOS.workflow_id or ""):  # also while it waits for its shape
        async with events.streaming(root, path, pipeline):
            app, registered = await open_pipeline(pipeline, version, path, root)
            ctx = RunContext(app=app, pipeline=registered, root=root, table=TABLE,
                             tracer=app.tracing, recorded=version)
            state = await handoff.resolve(state)
            if ctx.tracer is not None:
                return await ctx.tracer.workflow(ctx, path, lambda: _run_task(ctx, state, path, name))
            return await _run_task(ctx, state, path, name)


async def _run_task(ctx: RunContext, state: State, path: str, name: str) -> State:
    registered = ctx.pipeline
    node = registered.node_at(path)
    owner = registered.node_at(dispatch.parent_path(path))
    assert isinstance(owner, Dispatch)
    where = f"{path}:{name}"
    # Agents in a task with a progress_key publish their partial text as they stream it.
    token = agent.set_partial_sink(_publish_partial_text) if owner.progress_key else None
    try:
        try:
            result = await ctx.execute(node, path, state)
        finally:
            if token is not None:
                agent.reset_partial_sink(token)
        await ctx.settle()  # operations a node deferred (a gate's record) land before the end
        updates = await finish(ctx, path, state, result)
        if owner.on_complete is not None:
            on_complete = owner.on_complete

            async def complete() -> dict[str, Any] | None:
                return await _call(on_complete, name, updates)
            await run_step(f"{path}:on_complete", 0, complete)
    except Exception as exc:
        await ctx.settle(raise_errors=False)
        err = node_error(exc, where)
        if owner.on_error is not None:
            on_error = owner.on_error

            async def failed() -> dict[str, Any] | None:
                return await _call(on_error, name, err)
            await run_step(f"{path}:on_error", 0, failed)
        raise err from exc
    return updates


async def _call(cb: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
    """Run a monitoring callback. One that raises is logged and its error recorded as its
    step's output (``{"callback_error": ...}``); it does not change the task's outcome."""
    try:
        out = cb(*args)
        if inspect.isawaitable(out):
            await out
    except Exception as exc:
        text = error_text(exc)
        log.warning("callback %s of task %r raised %s; the task's outcome stands",
                    callable_name(cb), args[0], text)
        return {"callback_error": text, "callback": callable_name(cb)}
    return None


async def _publish_partial_text(where: str, text: str) -> None:
    await dispatch.progress_async(text)


TABLE = Table(handlers=HANDLERS, between=BETWEEN_HOOKS, finish=FINISH_HOOKS,
              run=run_pipeline, task=run_task)
