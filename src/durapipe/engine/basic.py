"""The handlers of the basic nodes: fn, transform, sleep, sequence and parallel.

I/O nodes (fn) are DBOS steps named ``<path>:<label>``; pure nodes (transform) run
inline. Runs of sync fns and transforms in a sequence share one worker thread.

Determinism: DBOS numbers a workflow's operations in the order they start, so concurrent
code inside one workflow must start its operations in an order that does not depend on
timing. Parallel branches whose operations the IR fixes (fn, transform, tool-less agents
and sequences of them) run inline at step numbers reserved in branch order before any
branch starts (``engine/reserve.py``); other branches run as child workflows started in
branch order.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from dbos import DBOS

from ..errors import DurapipeError, NodeFailed, StateError, error_text, storable_errors
from ..ir import Fn, Node, Parallel, Seq, Sleep, Transform
from ..retry import policy_of
from ..state import State, check_updates
from . import bounds, events, lifecycle, slots, steplogs, taskgroup
from . import steps as lean
from .children import await_child
from .context import RunContext, no_retry_for_durapipe_errors, node_error, run_step, step_options
from .current import active_step_log
from .handoff import Handoff
from .reserve import next_reservation, reserve, reserving, running_at, static_ops

# -- leaves -----------------------------------------------------------------------------


async def run_fn(ctx: RunContext, node: Fn, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    body: Callable[[], Any]
    if node.is_async:
        func, view = node.func, dict(state)

        async def body_async() -> State:
            return check_updates(await func(view), where)
        body = body_async
    else:
        body = _sync_body(node, where, state)
    result: State = await run_step(where, 0, body)  # retries=n: a durable policy (retry.py)
    return result


def _sync_body(node: Fn, where: str, state: State) -> Callable[[], State]:
    func, view = node.func, dict(state)

    def body() -> State:
        return check_updates(func(view), where)

    return body


def run_sync_fn(node: Fn, path: str, state: State) -> State:
    """A sync fn node as one DBOS step, called on a worker thread (see ``_sync_run``)."""
    where = f"{path}:{node.label}"
    body = storable_errors(events.attempts(where, steplogs.capturing(where, slots.observing(
        _sync_body(node, where, state)))))
    log = active_step_log()
    if not lifecycle.step_started():
        lifecycle.refuse_on_thread()  # the app is stopping: no new step starts
    try:
        step = lean.take_step(next_reservation(where)) if log is not None else None
        if log is not None and step is not None:
            result: State = lean.run_sync(log, step, where, 0, body,
                                          no_retry_for_durapipe_errors)
        else:
            result = DBOS.run_step(step_options(where, 0), body)  # type: ignore[call-overload]
    except Exception as exc:
        raise node_error(exc, where) from exc
    finally:
        lifecycle.step_done()
    return result


async def run_transform_node(ctx: RunContext, node: Transform, path: str, state: State) -> State:
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


async def run_sleep(ctx: RunContext, node: Sleep, path: str, state: State) -> State:
    await DBOS.sleep_async(node.seconds)
    return {}


# -- composites -------------------------------------------------------------------------

async def run_seq(ctx: RunContext, node: Seq, path: str, state: State) -> State:
    updates: State = {}
    nodes, i = node.nodes, 0
    while i < len(nodes):
        for hook in ctx.table.between if i else ():
            extra = await hook(ctx, path, state)
            if extra:
                state = {**state, **extra}
                updates.update(extra)
        run = _sync_run(ctx, nodes, i)
        if run > 1:
            out = await bounds.to_thread(_run_sync_nodes, nodes[i:i + run], path, i, state)
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
        or (isinstance(nodes[end], Fn) and not nodes[end].is_async  # type: ignore[attr-defined]
            and policy_of(nodes[end]) is None)
    ):
        end += 1
    return end - start


def _run_sync_nodes(nodes: tuple[Node, ...], path: str, first: int, state: State) -> State:
    updates: State = {}
    for i, child in enumerate(nodes, first):
        out = events.observe_sync(child, f"{path}.{i}", functools.partial(
            _run_sync_node, child, f"{path}.{i}", state))
        if out:
            state = {**state, **out}
            updates.update(out)
    return updates


def _run_sync_node(child: Node, path: str, state: State) -> State:
    if isinstance(child, Fn):
        return run_sync_fn(child, path, state)
    assert isinstance(child, Transform)
    return run_transform(child, path, state)


async def gather_branches(
    ctx: RunContext, branches: tuple[Node, ...], path: str, state: State, collect: bool = False
) -> list[Any]:
    """Run branches concurrently with a deterministic operation order; updates per branch.

    A branch whose operations the IR fixes runs inline at step numbers reserved for it
    before any branch starts (see ``reserve``); any other branch runs as a child workflow,
    started in branch order. The branches are a task group: the first failure cancels the
    branches still running and fails the node at once (see ``taskgroup``).
    """
    runs: list[Awaitable[Any]] = []
    children: dict[int, str] = {}
    slots = asyncio.Semaphore(bounds.limit())  # inline branches running at once
    handoff = Handoff(path, state)
    for i, branch in enumerate(branches):
        bpath = f"{path}.{i}"
        ops = static_ops(branch)
        if ops is not None:
            runs.append(_run_reserved(ctx, branch, bpath, state, reserve(ops), slots))
        else:
            handle = await ctx.start_child(branch, bpath, await handoff.input(branch))
            children[i] = handle.workflow_id
            runs.append(await_child(handle))
    futures = [asyncio.ensure_future(r) for r in runs]  # in branch order, as gather would
    labels = [f"{path}.{i}:{b.label}" for i, b in enumerate(branches)]
    if collect:  # every branch runs to its end; a failed one's error stands in its place
        try:
            await asyncio.wait(futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return [f.exception() or f.result() for f in futures]
    failure = await taskgroup.wait_all_or_first_failure(futures, children, labels)
    if failure is not None:
        i, cancelled = failure
        exc = futures[i].exception()
        assert exc is not None
        raise taskgroup.with_cancelled(node_error(exc, labels[i]), cancelled) from exc
    return [f.result() for f in futures]


async def _run_reserved(ctx: RunContext, branch: Node, path: str, state: State,
                        reservations: list[Any], slots: asyncio.Semaphore) -> State:
    async with slots:
        with running_at(reservations):
            return await ctx.execute(branch, path, state)


async def run_parallel(ctx: RunContext, node: Parallel, path: str, state: State) -> State:
    collect = node.errors == "collect"
    results = await gather_branches(ctx, node.branches, path, state, collect)
    merged: State = {}
    owner: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    for i, out in enumerate(results):
        if isinstance(out, BaseException):
            if not isinstance(out, Exception):
                raise out  # cancelled: the run stops here
            where = f"{path}.{i}:{node.branches[i].label}"
            err = node_error(out, where)
            cause = err.data.get("cause") if isinstance(err, DurapipeError) else None
            kind = cause.split(":", 1)[0] if isinstance(cause, str) and ":" in cause else type(err).__name__
            failures.append({"branch": i, "node": where, "error": error_text(err), "type": kind})
            continue
        for k, v in out.items():
            if k in owner:
                raise StateError(
                    f"parallel node {path}: branches {path}.{owner[k]} and {path}.{i} both "
                    f"wrote state key {k!r}; give each branch its own key",
                    node=path, key=k,
                )
            owner[k] = i
            merged[k] = v
    if collect:
        merged[node.errors_key or "errors"] = failures
    return merged
