"""The one DBOS workflow that runs every pipeline, and the table of node handlers.

A run is ``durapipe.run(pipeline, version, state, path="0", root=None)``. The workflow looks
the pipeline up by name in the launched App, continues a run recorded by another shape only
when its history is unchanged up to where it stopped (else leaves it waiting for a worker
with its shape, see ``engine/versions.py``), and walks the IR with one handler per node
type. I/O nodes (Agent, fn) are DBOS steps named ``<path>:<label>``; pure nodes run inline.

Paths of dynamic instances carry a mark: pass 2 of a loop body at ``0.3`` runs at
``0.3.0#2``, map item 5 at ``0.4.0#5``; :meth:`Registered.node_at` ignores the marks.

Determinism: DBOS numbers a workflow's operations in the order they start, so concurrent
code inside one workflow must start its operations in an order that does not depend on
timing. Parallel branches whose operations the IR fixes (fn, transform, tool-less agents
and sequences of them) run inline at step numbers reserved in branch order before any
branch starts (``engine/reserve.py``); other branches run as child workflows started in
branch order. Waits whose outcome depends on timing ("first done") are recorded.

Child workflows are awaited with :func:`children.await_child`, which avoids DBOS's
one-second polling while keeping its recorded ``DBOS.getResult`` operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from dbos import DBOS, SetWorkflowID
from dbos._error import DBOSMaxStepRetriesExceeded

from ..errors import DurapipeError, NodeFailed, StateError, error_text, from_portable, storable_errors
from ..ir import Agent, Fn, Node, Parallel, Seq, Sleep, Transform
from ..state import State, check_updates
from . import lifecycle, steplogs, taskgroup, versions
from . import steps as lean
from .children import await_child
from .reserve import next_reservation, reserve, reserving, running_at, static_ops

if TYPE_CHECKING:
    from .app import App
    from .runs import Registered
    from .tracing import Tracing

WORKFLOW_NAME = "durapipe.run"
# A dispatched background task runs in a workflow of its own kind (engine/dispatch.py).
TASK_WORKFLOW = "durapipe.task"
# Every workflow durapipe registers: runs and their subtrees, and background tasks.
DURAPIPE_WORKFLOWS = (WORKFLOW_NAME, TASK_WORKFLOW)
N = TypeVar("N", bound=Node)
Handler = Callable[["RunContext", Any, str, State], Awaitable[State]]
HANDLERS: dict[type[Node], Handler] = {}
# Extension points: BETWEEN_HOOKS run before each node of a sequence after the first
# ``(ctx, seq_path, state) -> updates``; FINISH_HOOKS when a workflow's node is done
# ``(ctx, path, state) -> updates``. Both run sequentially, so their DBOS operations keep
# a deterministic order.
Hook = Callable[["RunContext", str, State], Awaitable[State]]
BETWEEN_HOOKS: list[Hook] = []
FINISH_HOOKS: list[Hook] = []

_current: dict[str, App] = {}
# How long RunContext.defer lets the next node get going before a deferred operation starts.
DEFER_SECONDS = 0.02


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
    # Background tasks started by dispatch in this workflow and not joined yet, by name.
    tasks: dict[str, Any] = field(default_factory=dict)
    # Set when the app traces (engine/tracing.py); None costs one check per node.
    tracer: Tracing | None = None
    recorded_ops: int = 0
    # DBOS operations numbered already but left to run off the critical path (see defer).
    deferred: list[tuple[asyncio.Event, asyncio.Future[Any]]] = field(default_factory=list)
    # The shape this workflow was recorded by (its ``version`` argument).
    recorded: str = ""

    def defer(self, start: Callable[[], Awaitable[Any]], after: float | None = None) -> None:
        """Run an operation whose DBOS number is already reserved a little later.

        It starts ``after`` seconds (default ``DEFER_SECONDS``) from now, so the node that
        follows gets going first, or at the next ``settle``, whichever comes first. Every
        workflow settles before it returns or raises, and a node settles before it writes
        what a deferred operation writes.
        """
        go = asyncio.Event()
        delay = DEFER_SECONDS if after is None else after
        asyncio.get_running_loop().call_later(delay, go.set)

        async def run() -> Any:
            await go.wait()
            return await start()

        self.deferred.append((go, asyncio.ensure_future(run())))

    async def settle(self, raise_errors: bool = True) -> None:
        """Start the deferred operations now and wait for them; raise the first error."""
        pending, self.deferred = self.deferred, []
        for go, _ in pending:
            go.set()
        results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        for r in results:
            if raise_errors and isinstance(r, BaseException):
                raise r

    async def execute(self, node: Node, path: str, state: State) -> State:
        """Run one node; return the state updates it made."""
        handler = HANDLERS.get(type(node))
        if handler is None:
            raise DurapipeError(
                f"node {path}:{node.label}: node kind {node.kind!r} is not supported by this engine"
            )
        if self.tracer is not None:
            return await self.tracer.node(self, node, path, state, handler)
        return await handler(self, node, path, state)

    def child_id(self, path: str, node: Node) -> str:
        return f"{self.root}/{path}:{node.label}"

    async def start_child(self, node: Node, path: str, state: State) -> Any:
        """Start a subtree as a child workflow with a stable id; return its DBOS handle."""
        propagate = self.tracer.propagate() if self.tracer is not None else contextlib.nullcontext()
        with SetWorkflowID(self.child_id(path, node)), propagate:
            return await DBOS.start_workflow_async(
                run_pipeline, self.pipeline.name, self.pipeline.version, state, path, self.root
            )


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
    """Run ``body`` as one DBOS step named ``where``; wrap failures into durapipe errors.

    Inside a parallel branch that reserved its step numbers, the step runs at the next one.
    On Postgres the step row is written by :mod:`engine.steps` (one statement before the
    body, one after); otherwise by ``DBOS.run_step_async``.
    """
    body = steplogs.capturing(where, body)
    reservation = next_reservation(where)
    log = active_step_log()
    body = storable_errors(body)
    if not lifecycle.step_started():
        await lifecycle.hold()  # the app is stopping: no new step starts
    try:
        if log is not None:
            step = lean.take_step(reservation)
            if step is not None:
                if inspect.iscoroutinefunction(body):
                    return await lean.run_async(log, step, where, retries, body,
                                                _no_retry_for_durapipe_errors)
                return await asyncio.to_thread(lean.run_sync, log, step, where, retries, body,
                                               _no_retry_for_durapipe_errors)
        if reservation is not None:
            return await reservation.run_async(step_options(where, retries), body)
        return await DBOS.run_step_async(step_options(where, retries), body)  # type: ignore[call-overload]
    except Exception as exc:
        raise node_error(exc, where) from exc
    finally:
        lifecycle.step_done()


def active_step_log() -> lean.StepLog | None:
    """The launched app's step writer, or None when steps go through ``DBOS.run_step``."""
    app = _current.get("app")
    return app.step_log() if app is not None else None


# -- leaf handlers ----------------------------------------------------------------------

@handles(Fn)
async def _fn(ctx: RunContext, node: Fn, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    body: Callable[[], Any]
    if node.is_async:
        func, view = node.func, dict(state)

        async def body_async() -> State:
            return check_updates(await func(view), where)
        body = body_async
    else:
        body = _sync_body(node, where, state)
    result: State = await run_step(where, node.max_retries, body)
    return result


def _sync_body(node: Fn, where: str, state: State) -> Callable[[], State]:
    func, view = node.func, dict(state)

    def body() -> State:
        return check_updates(func(view), where)

    return body


def run_sync_fn(node: Fn, path: str, state: State) -> State:
    """A sync fn node as one DBOS step, called on a worker thread (see ``_sync_run``)."""
    where = f"{path}:{node.label}"
    body = storable_errors(steplogs.capturing(where, _sync_body(node, where, state)))
    log = active_step_log()
    if not lifecycle.step_started():
        lifecycle.refuse_on_thread()  # the app is stopping: no new step starts
    try:
        step = lean.take_step(next_reservation(where)) if log is not None else None
        if log is not None and step is not None:
            result: State = lean.run_sync(log, step, where, node.max_retries, body,
                                          _no_retry_for_durapipe_errors)
        else:
            result = DBOS.run_step(step_options(where, node.max_retries), body)  # type: ignore[call-overload]
    except Exception as exc:
        raise node_error(exc, where) from exc
    finally:
        lifecycle.step_done()
    return result


@handles(Transform)
async def _transform(ctx: RunContext, node: Transform, path: str, state: State) -> State:
    return run_transform(node, path, state)


def run_transform(node: Transform, path: str, state: State) -> State:
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


@handles(Sleep)
async def _sleep(ctx: RunContext, node: Sleep, path: str, state: State) -> State:
    await DBOS.sleep_async(node.seconds)
    return {}


# -- composite handlers -----------------------------------------------------------------

@handles(Seq)
async def _seq(ctx: RunContext, node: Seq, path: str, state: State) -> State:
    updates: State = {}
    nodes, i = node.nodes, 0
    while i < len(nodes):
        for hook in BETWEEN_HOOKS if i else ():
            extra = await hook(ctx, path, state)
            if extra:
                state = {**state, **extra}
                updates.update(extra)
        run = _sync_run(ctx, nodes, i)
        if run > 1:
            out = await asyncio.to_thread(_run_sync_nodes, nodes[i:i + run], path, i, state)
        else:
            run = 1
            out = await ctx.execute(nodes[i], f"{path}.{i}", state)
        if out:
            state = {**state, **out}
            updates.update(out)
        i += run
    return updates


def _sync_run(ctx: RunContext, nodes: tuple[Node, ...], start: int) -> int:
    """How many nodes from ``start`` are sync fns and transforms that may run back to back
    on one worker thread: one thread hop for the run instead of one per step.

    Each fn is still its own DBOS step, recorded before the next node starts, in the same
    order; only when nothing else would act between them (no tracing, no pending
    background task whose progress is refreshed between nodes). In a branch running at
    reserved step numbers, only steps written by :mod:`engine.steps` take them on the thread.
    """
    if ctx.tracer is not None or ctx.tasks or (reserving() and active_step_log() is None):
        return 0
    end = start
    while end < len(nodes) and (
        isinstance(nodes[end], Transform)
        or (isinstance(nodes[end], Fn) and not nodes[end].is_async)  # type: ignore[attr-defined]
    ):
        end += 1
    return end - start


def _run_sync_nodes(nodes: tuple[Node, ...], path: str, first: int, state: State) -> State:
    updates: State = {}
    for i, child in enumerate(nodes, first):
        if isinstance(child, Fn):
            out = run_sync_fn(child, f"{path}.{i}", state)
        else:
            assert isinstance(child, Transform)
            out = run_transform(child, f"{path}.{i}", state)
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
        return not node.tool_fns and node.output_model is None
    if isinstance(node, Seq):
        ops = [c for c in node.nodes if not isinstance(c, Transform)]
        return len(ops) <= 1 and all(single_op(c) for c in ops)
    return False


async def gather_branches(
    ctx: RunContext, branches: tuple[Node, ...], path: str, state: State
) -> list[State]:
    """Run branches concurrently with a deterministic operation order; updates per branch.

    A branch whose operations the IR fixes runs inline at step numbers reserved for it
    before any branch starts (see ``reserve``); any other branch runs as a child workflow,
    started in branch order. The branches are a task group: the first failure cancels the
    branches still running and fails the node at once (see ``taskgroup``).
    """
    runs: list[Awaitable[Any]] = []
    children: dict[int, str] = {}
    for i, branch in enumerate(branches):
        bpath = f"{path}.{i}"
        ops = static_ops(branch)
        if ops is not None:
            runs.append(_run_reserved(ctx, branch, bpath, state, reserve(ops)))
        else:
            handle = await ctx.start_child(branch, bpath, dict(state))
            children[i] = handle.workflow_id
            runs.append(await_child(handle))
    futures = [asyncio.ensure_future(r) for r in runs]  # in branch order, as gather would
    labels = [f"{path}.{i}:{b.label}" for i, b in enumerate(branches)]
    failure = await taskgroup.wait_all_or_first_failure(futures, children, labels)
    if failure is not None:
        i, cancelled = failure
        exc = futures[i].exception()
        assert exc is not None
        raise taskgroup.with_cancelled(node_error(exc, labels[i]), cancelled) from exc
    return [f.result() for f in futures]


async def _run_reserved(ctx: RunContext, branch: Node, path: str, state: State,
                        reservations: list[Any]) -> State:
    with running_at(reservations):
        return await ctx.execute(branch, path, state)


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


async def finish(ctx: RunContext, path: str, state: State, updates: State) -> State:
    """Run the FINISH_HOOKS of a workflow whose node returned ``updates``."""
    for hook in FINISH_HOOKS:
        extra = await hook(ctx, path, {**state, **updates})
        if extra:
            updates = {**updates, **extra}
    return updates


@DBOS.workflow(name=WORKFLOW_NAME)
async def run_pipeline(
    pipeline: str, version: str, state: State, path: str = "0", root: str | None = None
) -> State:
    run_id = DBOS.workflow_id or ""
    with lifecycle.running(run_id):  # also while it waits for a worker with its shape
        app, registered = await open_pipeline(pipeline, version, path, root or run_id)
        ctx = RunContext(app=app, pipeline=registered, root=root or run_id, tracer=app.tracing,
                         recorded=version)
        node = registered.node_at(path)

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


from . import agent as _agent  # noqa: E402,F401  (registers the Agent handler)
from . import control as _control  # noqa: E402,F401  (fallback, loop, route, race, timeout, map)
from . import dispatch as _dispatch  # noqa: E402,F401  (registers the dispatch/join handlers)
from . import flow as _flow_handlers  # noqa: E402,F401  (registers the Flow and Step handlers)
from . import gates as _gates  # noqa: E402,F401  (gates)
from . import patching as _patching  # noqa: E402,F401  (patched: old and new code side by side)
