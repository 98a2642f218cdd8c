"""The handler of ``best_of(n, node, score=)``: n candidates at once, the best one kept.

Candidate ``i`` runs as a child workflow at ``<path>.0#i`` (started in index order, so the
operations are numbered alike on every replay) with ``state[item_key] = i``. When every
candidate has finished, one step ``<path>:best_of(<label>)`` scores them and records the
candidates (their writes, or their errors), the scores and the winner. A replay reads that
row back: the same winner even with a score function that is not deterministic, and a
finished candidate is never run again (its child workflow's result is recorded).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from ..bestof import BestOf
from ..errors import NodeFailed, StateError, error_text, from_portable
from ..state import State
from .children import await_child
from .context import RunContext, run_step
from .handoff import Handoff


def _score(node: BestOf, state: State, updates: State, where: str, i: int) -> float:
    try:
        value = node.score({**state, **updates})
    except Exception as exc:
        raise NodeFailed(
            f"best_of {where}: score() raised {error_text(exc)} for candidate {i}; it must be "
            "a function of the state that returns a number", node=where, candidate=i,
            cause=error_text(exc),
        ) from exc
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise StateError(
            f"best_of {where}: score() returned {value!r} for candidate {i}; it must return a "
            "number (the highest wins)", node=where, candidate=i,
        )
    return float(value)


async def run_best_of(ctx: RunContext, node: BestOf, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    handoff = Handoff(path, state)
    handles = [await ctx.start_child(node.body, f"{path}.0#{i}",
                                     await handoff.input(node.body, {node.item_key: i}))
               for i in range(node.n)]
    waits = [asyncio.ensure_future(await_child(h)) for h in handles]
    try:
        outcomes = await asyncio.gather(*waits, return_exceptions=True)
    except BaseException:
        for w in waits:
            w.cancel()
        raise
    for out in outcomes:
        if isinstance(out, BaseException) and not isinstance(out, Exception):
            raise out  # cancelled: the run stops here

    def choose() -> dict[str, Any]:
        candidates: list[dict[str, Any]] = []
        best: int | None = None
        for i, out in enumerate(outcomes):
            if isinstance(out, BaseException):
                candidates.append({"index": i, "error": error_text(from_portable(out))})
                continue
            score = _score(node, state, out, where, i)
            candidates.append({"index": i, "score": score, "writes": out})
            if best is None or score > candidates[best]["score"]:
                best = i
        return {"winner": best, "candidates": candidates}

    record: dict[str, Any] = await run_step(where, 0, choose)
    winner = record["winner"]
    if winner is None:
        lines = [f"{path}.0#{c['index']}: {c['error']}" for c in record["candidates"]]
        raise NodeFailed(f"best_of {where}: every candidate failed: " + "; ".join(lines),
                         node=where, candidates=lines)
    result: State = record["candidates"][winner]["writes"]
    return result
