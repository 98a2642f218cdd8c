"""Limits and batch starts.

1. Start latency of a node under ``limit(key, concurrency=n)`` beside the same node
   unlimited: from ``start()`` to the node's body running (a free slot), and the hand-over
   of a limit of 1 from one run's body ending to the waiting run's body starting (a slot
   given back wakes the waiter through LISTEN/NOTIFY; a DBOS queue polls every second by
   default).
2. Starting N runs (1,000 in ``make bench``) with ``pipeline.start_many`` beside a loop of
   ``start()`` calls, interleaved; the runs then finish before the next round.

Run alone: ``python bench/bench_limits.py postgresql://... [N]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import uuid
from typing import Any

from common import table

from durapipe import App, fn, limit

ROUNDS = int(os.environ.get("BENCH_LIMIT_ROUNDS", "60"))
BATCH_ROUNDS = 3
BATCH_SIZE = 1000

_marks: dict[str, list[float]] = {}
_cond = threading.Condition()


def _mark(key: str, what: str) -> None:
    with _cond:
        _marks.setdefault(key, []).append(time.perf_counter())
        _marks.setdefault(key + ":" + what, []).append(time.perf_counter())
        _cond.notify_all()


def body(state: dict[str, Any]) -> dict[str, Any]:
    _mark(state["key"], "start")
    time.sleep(state.get("hold", 0.0))
    _mark(state["key"], "end")
    return {}


def noop(state: dict[str, Any]) -> None:
    return None


def _wait(key: str, count: int) -> list[float]:
    with _cond:
        if not _cond.wait_for(lambda: len(_marks.get(key + ":end", [])) >= count, timeout=60):
            raise TimeoutError(key)
        return _marks[key]


def section(url: str, batch_size: int = BATCH_SIZE) -> str:
    app = App("bench-limits", url)
    free = app.pipeline("free", fn(body))
    limited = app.pipeline("limited", limit("bench", fn(body), concurrency=2))
    one = app.pipeline("one", limit("one", fn(body), concurrency=1))
    batchy = app.pipeline("batchy", fn(noop))
    with app:
        starts: dict[str, list[float]] = {"unlimited": [], "limited (free slot)": []}
        handover: list[float] = []
        for r in range(ROUNDS + 5):
            for name, pipe in (("unlimited", free), ("limited (free slot)", limited)):
                key = uuid.uuid4().hex
                t0 = time.perf_counter()
                h = pipe.start({"key": key})
                began = _wait(key, 1)[0]
                h.result(timeout=60)
                if r >= 5:
                    starts[name].append((began - t0) * 1000)
            key = uuid.uuid4().hex
            hs = [one.start({"key": key, "hold": 0.02}) for _ in range(2)]
            marks = _wait(key, 2)
            for h in hs:
                h.result(timeout=60)
            ends, begins = _marks[key + ":end"], _marks[key + ":start"]
            if r >= 5:
                handover.append((begins[1] - ends[0]) * 1000)
            assert marks
        rows = [[name, f"{statistics.median(v):.1f}", f"{sorted(v)[int(0.95 * (len(v) - 1))]:.1f}"]
                for name, v in starts.items()]
        rows.append(["limit 1: one body ends -> next body starts",
                     f"{statistics.median(handover):.1f}",
                     f"{sorted(handover)[int(0.95 * (len(handover) - 1))]:.1f}"])
        ratio = statistics.median(starts["limited (free slot)"]) / statistics.median(starts["unlimited"])

        timings: dict[str, list[float]] = {"loop of start()": [], "start_many": []}
        for r in range(BATCH_ROUNDS):
            for name in ("loop of start()", "start_many"):
                inputs = [{} for _ in range(batch_size)]
                ids = [f"{name[:4]}-{r}-{i}-{uuid.uuid4().hex[:6]}" for i in range(batch_size)]
                t0 = time.perf_counter()
                if name == "start_many":
                    hs = batchy.start_many(inputs, run_ids=ids)
                else:
                    hs = [batchy.start(x, run_id=i) for x, i in zip(inputs, ids, strict=True)]
                timings[name].append((time.perf_counter() - t0) * 1000)
                for h in hs:
                    h.result(timeout=300)
        loop_ms = statistics.median(timings["loop of start()"])
        many_ms = statistics.median(timings["start_many"])
    return "\n".join([
        "## Limits and batch starts",
        "",
        f"Start latency: from `start()` to the body of the run's only node, {ROUNDS} rounds "
        "interleaved (ms); the limited node takes a free slot of `limit(..., concurrency=2)` "
        f"(ratio limited/unlimited {ratio:.2f}x). Hand-over: two runs under a limit of 1, "
        "from the first body's end to the second body's start.",
        "",
        table(rows, ["case", "median ms", "p95 ms"]),
        "",
        f"Starting {batch_size} runs of a one-step pipeline (until every handle is back; "
        f"median of {BATCH_ROUNDS} interleaved rounds): a loop of `start()` {loop_ms:.0f} ms, "
        f"`start_many` {many_ms:.0f} ms ({loop_ms / many_ms:.2f}x faster).",
        "",
    ])


if __name__ == "__main__":
    print(section(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else BATCH_SIZE))
