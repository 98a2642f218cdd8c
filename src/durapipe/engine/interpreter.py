"""The one DBOS workflow that runs every pipeline, and the table of node handlers.

A run is ``durapipe.run(pipeline, version, state, path="0", root=None)``. The workflow looks
the pipeline up by name in the launched App, refuses to replay a run recorded by a
pipeline of another shape, and walks the IR with one handler per node type. I/O nodes
(Agent, fn) are DBOS steps named ``<path>:<label>``; pure nodes run inline.

Paths of dynamic instances carry a mark: pass 2 of a loop body at ``0.3`` runs at
``0.3.0#2``, map item 5 at ``0.4.0#5``; :meth:`Registered.node_at` ignores the marks.

Determinism: DBOS numbers a workflow's operations in the order they start, so concurrent
code inside one workflow must start its operations in an order that does not depend on
timing. Parallel branches that start at most one operation (a step) run inline under
``asyncio.gather``; longer branches run as child workflows started in branch order.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dbos import DBOS, SetWorkflowID
from dbos._error import DBOSMaxStepRetriesExceeded

from ..errors import (
    DurapipeError, NodeFailed, PipelineChanged, StateError, error_text, from_portable,
)
from ..ir import Agent, Fn, Node, Parallel, Seq, Sleep, Transform
from ..models import ModelRequest, ModelResponse, resolve_model
from ..state import State, check_updates, render

if TYPE_CHECKING:
    from .app import App, Registered

WORKFLOW_NAME = "durapipe.run"
N = TypeVar("N", bound=Node)
Handler = Callable[["RunContext", Any, str, State], Awaitable[State]]
HANDLERS: dict[type[Node], Handler] = {}

_current: dict[str, App] = {}


def set_current_app(app: App | None) -> None:
    """Bind the launched App (DBOS is a process singleton, so there is at most one)."""
    _current.clear()
    if app is not None:
        _current["app"] = app


def current_app() -> App:
    app = _current.get("app")
    if app is None:
        raise DurapipeError("no durapipe App is launched in this process; use `with app:`")
    return app


def handles(node_type: type[N]) -> Callable[[Callable[[RunContext, N, str, State], Awaitable[State]]], Any]:
    """Register the handler of one node type: ``async (ctx, node, path, state) -> updates``."""

    def deco(f: Callable[[RunContext, N, str, State], Awaitable[State]]) -> Any:
        HANDLERS[node_type] = f
        return f

    return deco


@dataclass
class RunContext:
    app: App
    pipeline: Registered
    root: str

    async def execute(self, node: Node, path: str, state: State) -> State:
        """Run one node; return the state updates it made."""
        handler = HANDLERS.get(type(node))
        if handler is None:
            raise DurapipeError(
                f"node {path}:{node.label}: node kind {node.kind!r} is not supported by this engine"
            )
        return await handler(self, node, path, state)

    def child_id(self, path: str, node: Node) -> str:
        return f"{self.root}/{path}:{node.label}"

    async def start_child(self, node: Node, path: str, state: State) -> str:
        """Start a subtree as a child workflow with a stable id; return that id."""
        with SetWorkflowID(self.child_id(path, node)):
            handle = await DBOS.start_workflow_async(
                run_pipeline, self.pipeline.name, self.pipeline.version, state, path, self.root
            )
        return handle.workflow_id


# -- errors -----------------------------------------------------------------------------

def node_error(exc: BaseException, where: str) -> BaseException:
    """What a failed node raises: durapipe errors as they are, anything else as NodeFailed."""
    if isinstance(exc, DBOSMaxStepRetriesExceeded) and exc.errors:
        attempts = len(exc.errors)
        exc = exc.errors[-1]
        suffix = f" (after {attempts} attempts)"
    else:
        suffix = ""
    exc = from_portable(exc)
    if isinstance(exc, DurapipeError) or not isinstance(exc, Exception):
        return exc  # durapipe errors as they are; cancellation and friends untouched
    cause = error_text(exc)
    return NodeFailed(f"node {where} failed{suffix}: {cause}", node=where, cause=cause)


def _no_retry_for_durapipe_errors(exc: BaseException) -> bool:
    return not isinstance(exc, DurapipeError)


def step_options(where: str, retries: int) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": where}
    if retries:
        opts.update(retries_allowed=True, max_attempts=retries + 1, interval_seconds=0.5,
                    backoff_rate=2.0, should_retry=_no_retry_for_durapipe_errors)
    return opts


async def run_step(where: str, retries: int, body: Callable[[], Any]) -> Any:
    """Run ``body`` as one DBOS step named ``where``; wrap failures into durapipe errors."""
    try:
        return await DBOS.run_step_async(step_options(where, retries), body)  # type: ignore[arg-type]
    except Exception as exc:
        raise node_error(exc, where) from exc


# -- leaf handlers ----------------------------------------------------------------------

@handles(Fn)
async def _fn(ctx: RunContext, node: Fn, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    func = node.func
    view = dict(state)
    body: Callable[[], Any]
    if node.is_async:
        async def body_async() -> State:
            return check_updates(await func(view), where)
        body = body_async
    else:
        def body_sync() -> State:
            return check_updates(func(view), where)
        body = body_sync
    result: State = await run_step(where, node.max_retries, body)
    return result


@handles(Transform)
async def _transform(ctx: RunContext, node: Transform, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    try:
        out = node.func(dict(state))
    except Exception as exc:
        raise node_error(exc, where) from exc
    if inspect.isawaitable(out):
        raise NodeFailed(
            f"transform {where} returned an awaitable; transforms are pure and synchronous, "
            "use fn(...) for async work", node=where,
        )
    return check_updates(out, where)


@handles(Agent)
async def _agent(ctx: RunContext, node: Agent, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    prompt = render(node.instruction or "", state, f"agent {where}")
    app_model = ctx.app.model
    model_ref = app_model if app_model is not None else node.model_ref
    model_name = model_ref if isinstance(model_ref, str) else None

    async def call_model() -> dict[str, Any]:
        model = resolve_model(model_ref, node.name)  # looked up inside the step
        started = time.perf_counter()
        response: ModelResponse = await model.generate(
            ModelRequest(agent=node.name, prompt=prompt, model=model_name)
        )
        record = response.to_json()
        record["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return record

    record = await run_step(where, node.max_retries, call_model)
    return {node.key: record["text"]}


@handles(Sleep)
async def _sleep(ctx: RunContext, node: Sleep, path: str, state: State) -> State:
    await DBOS.sleep_async(node.seconds)
    return {}


# -- composite handlers -----------------------------------------------------------------

@handles(Seq)
async def _seq(ctx: RunContext, node: Seq, path: str, state: State) -> State:
    updates: State = {}
    for i, child in enumerate(node.nodes):
        out = await ctx.execute(child, f"{path}.{i}", state)
        if out:
            state = {**state, **out}
            updates.update(out)
    return updates


def single_op(node: Node) -> bool:
    """True when a node starts at most one DBOS operation, before it first suspends."""
    if isinstance(node, Transform):
        return True
    if isinstance(node, Fn):
        return True
    if isinstance(node, Agent):
        return not node.tool_fns
    if isinstance(node, Seq):
        ops = [c for c in node.nodes if not isinstance(c, Transform)]
        return len(ops) <= 1 and all(single_op(c) for c in ops)
    return False


async def gather_branches(
    ctx: RunContext, branches: tuple[Node, ...], path: str, state: State
) -> list[State]:
    """Run branches concurrently with a deterministic operation order; updates per branch."""
    runs: list[Awaitable[Any]] = []
    for i, branch in enumerate(branches):
        bpath = f"{path}.{i}"
        if single_op(branch):
            runs.append(ctx.execute(branch, bpath, dict(state)))
        else:
            child_id = await ctx.start_child(branch, bpath, dict(state))
            runs.append(DBOS.get_result_async(child_id))
    results = await asyncio.gather(*runs, return_exceptions=True)
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            raise node_error(r, f"{path}.{i}:{branches[i].label}") from r
    return [r for r in results]


@handles(Parallel)
async def _parallel(ctx: RunContext, node: Parallel, path: str, state: State) -> State:
    results = await gather_branches(ctx, node.branches, path, state)
    merged: State = {}
    owner: dict[str, int] = {}
    for i, out in enumerate(results):
        for k, v in out.items():
            if k in owner:
                raise StateError(
                    f"parallel node {path}: branches {path}.{owner[k]} and {path}.{i} both "
                    f"wrote state key {k!r}; give each branch its own key",
                    node=path, key=k,
                )
            owner[k] = i
            merged[k] = v
    return merged


# -- the workflow -----------------------------------------------------------------------

@DBOS.workflow(name=WORKFLOW_NAME)
async def run_pipeline(
    pipeline: str, version: str, state: State, path: str = "0", root: str | None = None
) -> State:
    app = current_app()
    registered = app.registered(pipeline)
    if registered.version != version:
        raise PipelineChanged(
            f"run {DBOS.workflow_id} was recorded by pipeline {pipeline!r} version {version}, "
            f"but this process registers version {registered.version}: its shape changed, and "
            "replaying old history against new code is refused. Finish or cancel old runs with "
            "the old code, or fork them to the new version deliberately",
            pipeline=pipeline, recorded=version, current=registered.version,
        )
    run_id = DBOS.workflow_id or ""
    ctx = RunContext(app=app, pipeline=registered, root=root or run_id)
    node = registered.node_at(path)
    updates = await ctx.execute(node, path, state)
    if path == "0":
        return {**state, **updates}
    return updates


# Handlers of further node kinds register themselves on import.
from . import control, gates  # noqa: E402,F401
