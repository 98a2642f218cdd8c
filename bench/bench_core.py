"""Foundation benchmark: 10 sequential no-op fn nodes versus a hand-written DBOS workflow
with 10 no-op steps, interleaved in one process on one Postgres; and what ten transforms cost."""

from __future__ import annotations

import time
from typing import Any

from common import interleave, median, p95, table
from dbos import DBOS

from durapipe import App, fn, transform

ROUNDS = 200


def noop(state: dict[str, Any]) -> None:
    return None


def raw_noop() -> None:
    return None


@DBOS.workflow(name="bench.raw_steps")
async def raw_steps(n: int) -> int:
    for i in range(n):
        await DBOS.run_step_async({"name": f"s{i}"}, raw_noop)
    return n


def section(database_url: str) -> str:
    app = App("bench-core", database_url)
    seq10 = app.pipeline("seq10", fn(noop) >> fn(noop) >> fn(noop) >> fn(noop) >> fn(noop)
                         >> fn(noop) >> fn(noop) >> fn(noop) >> fn(noop) >> fn(noop))
    one = app.pipeline("one", fn(noop))
    t = transform(lambda s: {"k": s.get("k", 0) + 1}, name="inc")
    one_t10 = app.pipeline("one_t10", fn(noop) >> t >> t >> t >> t >> t >> t >> t >> t >> t >> t)
    with app:
        def raw() -> None:
            DBOS.start_workflow(raw_steps, 10).get_result()

        times = interleave({
            "durapipe 10 fn nodes": lambda: seq10.run({}),
            "raw DBOS 10 steps": raw,
            "durapipe 1 fn node": lambda: one.run({}),
            "durapipe 1 fn + 10 transforms": lambda: one_t10.run({}),
        }, ROUNDS)
        run = one_t10.run({}, run_id=f"t10-{time.time()}")
        steps = DBOS.list_workflow_steps(run.run_id)
    d, r = median(times["durapipe 10 fn nodes"]), median(times["raw DBOS 10 steps"])
    rows = [[name, f"{median(xs):.2f}", f"{p95(xs):.2f}"] for name, xs in times.items()]
    extra = median(times["durapipe 1 fn + 10 transforms"]) - median(times["durapipe 1 fn node"])
    return "\n".join([
        "## Foundation: sequential no-op nodes",
        "",
        f"{ROUNDS} rounds, interleaved, one process, one Postgres. Milliseconds per run "
        "(start to result).",
        "",
        table(rows, ["case", "median ms", "p95 ms"]),
        "",
        f"- durapipe / raw DBOS, 10 nodes (medians): **{d / r:.2f}x** (target <= 1.10x)",
        f"- ten `transform` nodes: {len(steps)} step rows recorded for a run of 1 fn + 10 "
        f"transforms (the fn's only); median cost over 1 fn alone: {extra:+.2f} ms",
        "",
    ])
