"""Handlers of the control-flow nodes: fallback, loop, route, race, timeout and map.

Every decision that depends on timing ("which branch finished first", "did the body beat
its deadline") is taken through a DBOS operation that records it (``DBOS.asyncio_wait``,
a step holding a deadline), so a replay takes the same decision. Operations are always
started in an order that does not depend on timing: see the module docstring of
:mod:`durapipe.engine.basic`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from dbos import DBOS
from dbos._error import DBOSUnexpectedStepError

from ..errors import (
    DurapipeError,
    NodeFailed,
    NodeTimeout,
    PipelineChanged,
    StateError,
    error_text,
    from_portable,
)
from ..ir import Agent, Fallback, Fn, Loop, MapOver, Node, Race, Route, Timeout, Transform, callable_name
from ..state import State
from . import bounds, lifecycle, taskgroup
from .children import await_child
from .context import RunContext, node_error, run_step
from .handoff import Handoff
from .reserve import reserve, running_at, single_op, static_ops

log = logging.getLogger("durapipe")


def recoverable(exc: BaseException) -> bool:
    """Errors a fallback may answer: not cancellation, replay divergence or a changed pipeline."""
    return isinstance(exc, Exception) and not isinstance(
        exc, (DBOSUnexpectedStepError, PipelineChanged)
    )


def restate(exc: BaseException, message: str, **data: Any) -> BaseException:
    """The same durapipe error class with a message that says more; others become NodeFailed."""
    exc = from_portable(exc)
    if isinstance(exc, DurapipeError):
        return type(exc)(message, **{**exc.data, **data})
    return NodeFailed(message, cause=error_text(exc), **data)


def call_pred(pred: Callable[[State], Any], state: State, what: str, where: str) -> Any:
    try:
        return pred(dict(state))
    except Exception as exc:
        raise NodeFailed(
            f"{what} at {where} raised {error_text(exc)}; it must be a function of the state "
            "dict that returns a value", node=where, cause=error_text(exc),
        ) from exc


# -- fallback ---------------------------------------------------------------------------

async def run_fallback(ctx: RunContext, node: Fallback, path: str, state: State) -> State:
    failures: list[tuple[str, BaseException]] = []
    for i, attempt in enumerate(node.attempts):
        where = f"{path}.{i}:{attempt.label}"
        try:
            # A copy: an attempt that fails must leave nothing behind, not even in place edits.
            return await ctx.execute(attempt, f"{path}.{i}", copy.deepcopy(state))
        except BaseException as exc:
            if not recoverable(exc):
                raise
            failures.append((where, node_error(exc, where)))
    last_where, last = failures[-1]
    earlier = [f"{w}: {error_text(e)}" for w, e in failures[:-1]]
    message = f"{last} (every attempt of fallback {path} failed; earlier: {'; '.join(earlier)})"
    raise restate(last, message, attempts=earlier + [f"{last_where}: {error_text(last)}"]) from last


# -- loop -------------------------------------------------------------------------------

async def run_loop(ctx: RunContext, node: Loop, path: str, state: State) -> State:
    passes = node.times if node.times is not None else node.until.max if node.until else 1
    updates: State = {}
    for k in range(passes):
        out = await ctx.execute(node.body, f"{path}.0#{k}", state)
        if out:
            state = {**state, **out}
            updates.update(out)
        if node.until is not None and call_pred(
            node.until.pred, state, "the until() predicate of loop", f"{path}:{node.label} pass {k}"
        ):
            break
    else:
        if node.until is not None:
            # The predicate never held: a step records that the loop stopped at its bound, so
            # the audit (and durapipe.steps) shows it, not only the state it left.
            where = f"{path}:{node.label}"
            record: dict[str, Any] = {"max_reached": True, "passes": passes,
                                      "until": callable_name(node.until.pred)}

            def reached(record: dict[str, Any] = record) -> dict[str, Any]:
                return record
            await run_step(where, 0, reached)
            log.warning("loop %s stopped at its max of %d passes; until(%s) never held",
                        where, passes, record["until"])
    return updates


# -- route ------------------------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def _jsonable(v: Any) -> Any:
    return v if v is None or isinstance(v, (str, int, float, bool)) else repr(v)


async def run_route(ctx: RunContext, node: Route, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    if isinstance(node.selector, str):
        if node.selector not in state:
            raise StateError(
                f"route {where} selects on state key {node.selector!r}, which is not in state "
                f"(keys present: {sorted(state)}); write it upstream or pass it as a run input",
                node=where, key=node.selector,
            )
        value = state[node.selector]
    else:
        value = call_pred(node.selector, state, "the selector of route", where)
    for i, (choice, branch) in enumerate(node.branches):
        if _same(choice, value):
            return await ctx.execute(branch, f"{path}.{i}", state)
    if node.default is not None:
        return await ctx.execute(node.default, f"{path}.{len(node.branches)}", state)
    # Nothing runs; a step records that, so the audit shows the route was skipped and why.
    record = {"skipped": True, "selected": _jsonable(value),
              "choices": [_jsonable(c) for c, _ in node.branches]}
    await run_step(where, 0, lambda: record)
    return {}


# -- race -------------------------------------------------------------------------------

async def run_race(ctx: RunContext, node: Race, path: str, state: State) -> State:
    handoff = Handoff(path, state)
    children = [await ctx.start_child(b, f"{path}.{i}", await handoff.input(b))
                for i, b in enumerate(node.branches)]
    ids = [c.workflow_id for c in children]
    waits = [asyncio.ensure_future(await_child(c)) for c in children]
    pending = list(range(len(ids)))
    errors: dict[int, BaseException] = {}
    winner: int | None = None
    while pending and winner is None:
        done, _ = await DBOS.asyncio_wait([waits[i] for i in pending],
                                          return_when=asyncio.FIRST_COMPLETED)
        for i in [i for i in pending if waits[i] in done]:
            pending.remove(i)
            exc = waits[i].exception()
            if exc is not None:
                errors[i] = exc
            elif winner is None:
                winner = i
    for i in pending:
        await DBOS.cancel_workflow_async(ids[i], cancel_children=True)
        lifecycle.cancel_local(ids[i])  # a loser's step in flight here stops at its next await
    # The losers' waits see CANCELLED and end; nothing of the race is left running.
    await asyncio.gather(*(waits[i] for i in pending), return_exceptions=True)
    if winner is None:
        lines = [f"{path}.{i}:{node.branches[i].label}: {error_text(from_portable(e))}"
                 for i, e in sorted(errors.items())]
        raise NodeFailed(f"race {path}: every branch failed: " + "; ".join(lines),
                         node=f"{path}:{node.label}", branches=lines)
    result: State = waits[winner].result()
    return result


# -- timeout ----------------------------------------------------------------------------

async def run_timeout(ctx: RunContext, node: Timeout, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    body_where = f"{path}.0:{node.body.label}"
    seconds = node.seconds
    # The deadline is recorded first, so a restart waits only for what is left of it.
    deadline: float = await run_step(where, 0, lambda: time.time() + seconds)
    child = await ctx.start_child(node.body, f"{path}.0",
                                  await Handoff(path, state).input(node.body, share=False))
    wait = asyncio.ensure_future(await_child(child))
    done, _ = await DBOS.asyncio_wait([wait], timeout=max(0.0, deadline - time.time()))
    if wait in done:
        exc = wait.exception()
        if exc is not None:
            raise node_error(exc, body_where) from exc
        result: State = wait.result()
        return result
    await DBOS.cancel_workflow_async(child.workflow_id, cancel_children=True)
    lifecycle.cancel_local(child.workflow_id)
    await asyncio.gather(wait, return_exceptions=True)
    raise NodeTimeout(
        f"node {body_where} ran past its timeout of {seconds:g} s and was cancelled",
        node=body_where, seconds=seconds,
    )


# -- map --------------------------------------------------------------------------------

def _result_key(body: Node) -> str | None:
    """The one state key a body writes, when it says so; its value is then the item result."""
    if isinstance(body, Agent):
        return body.key
    if isinstance(body, (Fn, Transform)) and body.writes is not None and len(body.writes) == 1:
        return body.writes[0]
    return None


async def run_map(ctx: RunContext, node: MapOver, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    items = state.get(node.items_key)
    if not isinstance(items, list):
        raise StateError(
            f"map {where} runs over state key {node.items_key!r}, which holds "
            f"{'nothing' if node.items_key not in state else 'a ' + type(items).__name__}; "
            "it needs a list", node=where, key=node.items_key,
        )
    inline = single_op(node.body)
    if inline and node.concurrency is None:
        return await _map_inline(ctx, node, path, state, items)
    limit = node.concurrency or bounds.limit()
    futures: dict[int, asyncio.Future[Any]] = {}
    live: list[int] = []  # started and not yet seen done, in item order: at most ~limit
    children: dict[int, str] = {}
    handoff = Handoff(path, state)

    async def start(i: int) -> asyncio.Future[Any]:
        ipath = f"{path}.0#{i}"
        if inline:
            istate = {**state, node.item_key: items[i]}
            fut = asyncio.ensure_future(ctx.execute(node.body, ipath, istate))
            await asyncio.sleep(0)  # let it start its one operation now, in item order
            return fut
        istate = await handoff.input(node.body, {node.item_key: items[i]})
        child = await ctx.start_child(node.body, ipath, istate)
        children[i] = child.workflow_id
        return asyncio.ensure_future(await_child(child))

    def running() -> list[int]:
        # Only the live items, not every started one: a scan of all of them per started
        # item made a 10,000-item map spend seconds of its event loop in this list.
        return [i for i in live if not futures[i].done()]

    labels = [f"{path}.0#{i}:{node.body.label}" for i in range(len(items))]
    collect = node.errors == "collect"
    failure: tuple[int, list[str]] | None = None
    try:
        # Items start in order while fewer than ``limit`` run; which one finished first is
        # recorded (DBOS.asyncio_wait), so a replay starts the next ones at the same points.
        while len(futures) < len(items):
            while len(futures) < len(items) and len(running()) < limit:
                live.append(len(futures))
                futures[len(futures)] = await start(len(futures))
            if len(futures) == len(items):
                break
            order = running()
            await DBOS.asyncio_wait([futures[i] for i in order], return_when=asyncio.FIRST_COMPLETED)
            # An item that failed is found while it is still live (it leaves `live` only
            # once seen done here), so the first failure is the same as over every item.
            bad = [i for i in live if taskgroup.failed(futures[i])] if not collect else []
            live = [i for i in live if not futures[i].done()]
            if bad:
                stopping = running()
                await taskgroup.cancel_siblings(futures, children, stopping)
                failure = bad[0], [labels[j] for j in stopping]
                break
    except BaseException:
        for f in futures.values():
            f.cancel()
        raise
    if collect:
        return await _collected(node, items, [futures[i] for i in range(len(items))], labels)
    if failure is None:
        ordered = [futures[i] for i in range(len(futures))]
        failure = await taskgroup.wait_all_or_first_failure(ordered, children, labels)
    return _map_result(node, where, [futures[i] for i in range(len(futures))], labels, failure)


def _map_result(node: MapOver, where: str, futures: list[asyncio.Future[Any]],
                labels: list[str], failure: tuple[int, list[str]] | None) -> State:
    if failure is not None:
        i, cancelled = failure
        exc = futures[i].exception()
        assert exc is not None
        exc = node_error(exc, labels[i])
        raise taskgroup.with_cancelled(
            restate(exc, f"map {where}: item {i} failed: {exc}", node=where, item=i), cancelled,
        ) from exc
    key = _result_key(node.body)
    results = [f.result() for f in futures]
    return {node.output_key: [r.get(key) for r in results] if key else results}


async def _collected(node: MapOver, items: list[Any], futures: list[asyncio.Future[Any]],
                     labels: list[str]) -> State:
    """``errors="collect"``: every item finished; failures listed, successes in place."""
    try:
        if futures:
            await asyncio.wait(futures)
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    key = _result_key(node.body)
    results: list[Any] = []
    failures: list[dict[str, Any]] = []
    for i, f in enumerate(futures):
        exc = f.exception()
        if exc is None:
            r = f.result()
            results.append(r.get(key) if key else r)
            continue
        if not isinstance(exc, Exception):
            raise exc  # cancelled: the run stops here
        err = node_error(exc, labels[i])
        results.append(None)
        failures.append({"index": i, "item": items[i], "node": labels[i],
                         "error": error_text(err), "type": failure_type(err)})
    return {node.output_key: results, node.failures_key: failures}


def failure_type(err: BaseException) -> str:
    """The class name of the error a node's code raised (``ValueError``), else its own."""
    cause = err.data.get("cause") if isinstance(err, DurapipeError) else None
    if isinstance(cause, str) and ":" in cause:
        return cause.split(":", 1)[0]
    return type(err).__name__
async def _map_inline(ctx: RunContext, node: MapOver, path: str, state: State,
                      items: list[Any]) -> State:
    """Items whose body starts at most one operation, at most ``bounds.limit()`` at once.

    Every item's operation number is drawn in item order before any item runs (as the
    inline branches of ``a | b`` do, see ``reserve``), so which item waits for a free slot
    never changes the numbering, and no decision needs recording. The numbers are the ones
    an unbounded map gives its items.
    """
    where = f"{path}:{node.label}"
    ops = static_ops(node.body)
    assert ops is not None
    slots = asyncio.Semaphore(bounds.limit())
    numbers = [reserve(ops) for _ in items]

    async def item(i: int) -> State:
        async with slots:
            with running_at(numbers[i]):
                return await ctx.execute(node.body, f"{path}.0#{i}",
                                         {**state, node.item_key: items[i]})

    futures: list[asyncio.Future[Any]] = [asyncio.ensure_future(item(i)) for i in range(len(items))]
    labels = [f"{path}.0#{i}:{node.body.label}" for i in range(len(items))]
    if node.errors == "collect":
        return await _collected(node, items, futures, labels)
    failure = await taskgroup.wait_all_or_first_failure(futures, {}, labels)
    return _map_result(node, where, futures, labels, failure)
