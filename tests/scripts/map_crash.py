"""Runs of a map over a list in a large state, with a two-step body; SIGKILL mid-map.

Usage: map_crash.py DATABASE_URL LOG_PATH RUNS KILL_AT
Each step appends ``run:item.label`` to the log after its work; the process SIGKILLs
itself right after the line KILL_AT names (before DBOS records that step). With KILL_AT
= 0 it recovers, starts the same run ids again (idempotent), waits and checks results.
The state carries a 200 KB document, so every item starts from a reference to one
recorded snapshot of the state (``engine/handoff.py``), not from a copy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from side_effects import KillingLog

from durapipe import App, fn, map_over

url, log, runs, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ITEMS = 30
DOC = "d" * 200_000
killing = KillingLog(log, kill_at)


def note(state: dict[str, Any], label: str) -> None:
    killing.write(f"{state['run']}:{state['item']}.{label}")


def a(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "a")
    return {"a": state["item"] + len(state["doc"])}


def b(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "b")
    return {"b": state["a"] * 2}


app = App("map-crash", url)
pipeline = app.pipeline("map", map_over("items", fn(a) >> fn(b), "out"))

if __name__ == "__main__":
    with app:
        inputs = [{"run": f"m{i}", "items": list(range(ITEMS)), "doc": DOC} for i in range(runs)]
        if kill_at != "0":
            for i, state in enumerate(inputs):
                pipeline.start(state, run_id=f"m{i}")
            time.sleep(120)
            print("KILL POINT NEVER REACHED", flush=True)
            sys.exit(3)
        handles = [pipeline.start(state, run_id=f"m{i}") for i, state in enumerate(inputs)]
        for handle in handles:
            out = handle.result(timeout=120).state["out"]
            assert [o["b"] for o in out] == [(i + len(DOC)) * 2 for i in range(ITEMS)], out
        print("ALL DONE", flush=True)
