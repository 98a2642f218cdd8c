"""dispatch/join latency beside raw DBOS, measured interleaved in one process.

``section(database_url)`` returns a markdown section:
- dispatch -> first step: from just before the dispatch to the start of the background
  task's first step, vs a raw DBOS workflow that starts a child whose step records the time;
- join of a finished task: the join of a task that already finished, vs a raw
  ``DBOS.get_result_async`` of a finished child, and vs the child's handle's
  ``get_result()`` (which, like durapipe's join of a task started in this process, reads
  nothing from the database before recording the result).

Run alone: ``python bench/bench_dispatch.py postgresql://...``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from typing import Any

from dbos import DBOS, SetWorkflowID

from durapipe import App, dispatch, fn, join, transform

ROUNDS = 40


def _stamp(key: str) -> Any:
    return transform(lambda s: {key: time.time()}, name=f"stamp_{key}")


def _first_step(state: dict[str, Any]) -> dict[str, Any]:
    return {"dispatch_ms": (time.time() - state["t0"]) * 1000}


def _noop(state: dict[str, Any]) -> dict[str, Any]:
    return {"done": True}


def _let_it_finish(state: dict[str, Any]) -> None:
    time.sleep(0.1)


DISPATCH = _stamp("t0") >> dispatch(fn(_first_step, name="first"), names=["t"]) >> join()
JOIN = (dispatch(fn(_noop), names=["t"]) >> fn(_let_it_finish) >> _stamp("t2") >> join()
        >> transform(lambda s: {"join_ms": (time.time() - s["t2"]) * 1000}, name="join_ms"))


async def _raw_first_step(t0: float) -> float:
    return (time.time() - t0) * 1000


@DBOS.workflow(name="bench.raw_child")
async def raw_child(t0: float) -> float:
    return float(await DBOS.run_step_async({"name": "first"}, _raw_first_step, t0))


@DBOS.workflow(name="bench.raw_dispatch")
async def raw_dispatch() -> float:
    t0 = time.time()
    handle = await DBOS.start_workflow_async(raw_child, t0)
    return float(await handle.get_result())


@DBOS.workflow(name="bench.raw_join")
async def raw_join() -> float:
    handle = await DBOS.start_workflow_async(raw_child, time.time())
    await DBOS.run_step_async({"name": "wait"}, asyncio.sleep, 0.1)
    t2 = time.time()
    await DBOS.get_result_async(handle.workflow_id)
    return (time.time() - t2) * 1000


@DBOS.workflow(name="bench.raw_join_handle")
async def raw_join_handle() -> float:
    handle = await DBOS.start_workflow_async(raw_child, time.time())
    await DBOS.run_step_async({"name": "wait"}, asyncio.sleep, 0.1)
    t2 = time.time()
    await handle.get_result()
    return (time.time() - t2) * 1000


def _raw(workflow: Any) -> float:
    with SetWorkflowID(f"bench-{uuid.uuid4()}"):
        return float(DBOS.start_workflow(workflow).get_result(polling_interval_sec=0.01))


def section(database_url: str) -> str:
    """Markdown: median dispatch and join latencies of durapipe and raw DBOS."""
    app = App("bench-dispatch", database_url)
    dispatch_p = app.pipeline("dispatch", DISPATCH)
    join_p = app.pipeline("join", JOIN)
    samples: dict[str, list[float]] = {k: [] for k in ("dp_d", "raw_d", "dp_j", "raw_j", "raw_h")}
    with app:
        for i in range(ROUNDS + 3):
            dp_d = dispatch_p.run({}).state["dispatch_ms"]
            raw_d = _raw(raw_dispatch)
            dp_j = join_p.run({}).state["join_ms"]
            raw_j = _raw(raw_join)
            raw_h = _raw(raw_join_handle)
            if i >= 3:  # warm-up rounds are dropped
                for k, v in zip(samples, (dp_d, raw_d, dp_j, raw_j, raw_h), strict=True):
                    samples[k].append(v)
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = [
        ("dispatch -> first step of the task", med["dp_d"], med["raw_d"]),
        ("join of an already finished task (raw: `DBOS.get_result_async`)", med["dp_j"],
         med["raw_j"]),
        ("join of an already finished task (raw: `handle.get_result()`)", med["dp_j"],
         med["raw_h"]),
    ]
    lines = [
        "## dispatch / join",
        "",
        f"Median of {ROUNDS} interleaved rounds in one process on the same database. Raw DBOS: "
        "`start_workflow_async` of a child whose first step records the time, and "
        "`get_result_async` (or the handle's `get_result()`) of a finished child.",
        "",
        "| measure | durapipe (ms) | raw DBOS (ms) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, ours, raw in rows:
        lines.append(f"| {name} | {ours:.2f} | {raw:.2f} | {ours / raw:.2f}x |")
    lines.append("")
    lines.append(
        "Database writes: a dispatch writes one transaction (the child's status row, its "
        "input and the parent's record of the start: DBOS's own `start_workflow`), a join "
        "one (the `DBOS.getResult` row naming the child). The audit (`background_tasks`, "
        "`durapipe show`) reads the task's status from those rows; only a `timed_out` or "
        "`auto_joined` task adds one event write. A join of a task this process started "
        "takes the result from the finished in-process task instead of reading it back.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(section(sys.argv[1]))
