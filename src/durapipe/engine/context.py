"""What every node handler needs: the run context, steps, errors and hooks.

A handler is ``async (ctx, node, path, state) -> updates``. It runs its I/O as DBOS steps
with :func:`run_step`, turns failures into durapipe errors with :func:`node_error`, and
runs any child node through ``ctx.execute`` (or as a child workflow with
``ctx.start_child``). Which handler runs which node kind, and which workflows run
subtrees and tasks, is the :class:`Table` the workflows install on the context
(``engine/interpreter.py``): a handler never imports that table, nor another handler's
module.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dbos import DBOS, SetWorkflowID
from dbos._error import DBOSMaxStepRetriesExceeded

from ..errors import DurapipeError, NodeFailed, error_text, from_portable, storable_errors
from ..ir import Node
from ..state import State
from . import bounds, events, lifecycle, slots, steplogs
from . import steps as lean
from .current import active_step_log
from .reserve import next_reservation

if TYPE_CHECKING:
    from .app import App
    from .runs import Registered
    from .tracing import Tracing

Handler = Callable[["RunContext", Any, str, State], Awaitable[State]]
# Hooks: ``between`` hooks run before each node of a sequence after the first
# ``(ctx, seq_path, state) -> updates``; ``finish`` hooks when a workflow's node is done
# ``(ctx, path, state) -> updates``. Both run sequentially, so their DBOS operations keep
# a deterministic order.
Hook = Callable[["RunContext", str, State], Awaitable[State]]

# How long RunContext.defer lets the next node get going before a deferred operation starts.
DEFER_SECONDS = 0.02


@dataclass(frozen=True)
class Table:
    """The engine as the workflows run it: a handler per node type, the hooks, and the
    DBOS workflows that run a subtree (``run``) and a dispatched task (``task``)."""

    handlers: Mapping[type[Node], Handler]
    between: tuple[Hook, ...]
    finish: tuple[Hook, ...]
    run: Callable[..., Coroutine[Any, Any, State]]
    task: Callable[..., Coroutine[Any, Any, State]]


@dataclass
class RunContext:
    app: App
    pipeline: Registered
    root: str
    table: Table
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
        handler = self.table.handlers.get(type(node))
        if handler is None:
            raise DurapipeError(
                f"node {path}:{node.label}: node kind {node.kind!r} is not supported by this engine"
            )
        if events.active() is not None:
            out: State = await events.observe(node, path, lambda: self._run(handler, node, path,
                                                                             state))
            return out
        return await self._run(handler, node, path, state)

    async def _run(self, handler: Handler, node: Node, path: str, state: State) -> State:
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
                self.table.run, self.pipeline.name, self.pipeline.version, state, path, self.root
            )


async def finish(ctx: RunContext, path: str, state: State, updates: State) -> State:
    """Run the finish hooks of a workflow whose node returned ``updates``."""
    for hook in ctx.table.finish:
        extra = await hook(ctx, path, {**state, **updates})
        if extra:
            updates = {**updates, **extra}
    return updates


# -- errors and steps -------------------------------------------------------------------

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


def no_retry_for_durapipe_errors(exc: BaseException) -> bool:
    return not isinstance(exc, DurapipeError)


def step_options(where: str, retries: int) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": where}
    if retries:
        opts.update(retries_allowed=True, max_attempts=retries + 1, interval_seconds=0.5,
                    backoff_rate=2.0, should_retry=no_retry_for_durapipe_errors)
    return opts


async def run_step(where: str, retries: int, body: Callable[[], Any]) -> Any:
    """Run ``body`` as one DBOS step named ``where``; wrap failures into durapipe errors.

    Inside a parallel branch that reserved its step numbers, the step runs at the next one.
    On Postgres the step row is written by :mod:`engine.steps` (one statement before the
    body, one after); otherwise by ``DBOS.run_step_async``.
    """
    body = events.attempts(where, steplogs.capturing(where, slots.observing(body)))
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
                                                no_retry_for_durapipe_errors)
                return await bounds.to_thread(lean.run_sync, log, step, where, retries, body,
                                               no_retry_for_durapipe_errors)
        if reservation is not None:
            return await reservation.run_async(step_options(where, retries), body)
        return await DBOS.run_step_async(step_options(where, retries), body)  # type: ignore[call-overload]
    except Exception as exc:
        raise node_error(exc, where) from exc
    finally:
        lifecycle.step_done()
