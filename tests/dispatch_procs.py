"""Processes for the dispatch crash and multi-worker tests.

``crash <db> <dir> <phase> [<blocked>]``: phase 1 starts a run whose main pipeline step
and background tasks named in ``<blocked>`` (default ``a,b,main``) block after writing a
marker each (the test then SIGKILLs the process); a task not named finishes and runs its
callback. Phase 2 recovers and prints the final state. Every step and callback appends a
line to ``<dir>/log``.

``web <db> <dir>`` starts a run that dispatches on queue ``bg`` and dequeues nothing
itself; ``worker <db> <dir>`` writes ``<dir>/ready`` once launched, then only executes
queued work until ``<dir>/stop`` exists.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from durapipe import App, dispatch, fn, join

DB, DIR, ROLE = sys.argv[2], Path(sys.argv[3]), sys.argv[1]
PHASE = sys.argv[4] if len(sys.argv) > 4 else "2"
BLOCKED = (sys.argv[5] if len(sys.argv) > 5 else "a,b,main").split(",")


def log(line: str) -> None:
    with open(DIR / "log", "a") as f:
        f.write(line + "\n")


def block_first_time(name: str) -> None:
    if PHASE == "1" and name in BLOCKED:
        (DIR / f"marker-{name}").write_text("x")
        time.sleep(600)


def writer(state: dict[str, Any]) -> dict[str, Any]:
    log("writer")
    return {"draft": "d"}


def bg_a(state: dict[str, Any]) -> dict[str, Any]:
    block_first_time("a")
    log("bg_a done")
    return {"a": state["draft"] + "-a"}


def bg_b(state: dict[str, Any]) -> dict[str, Any]:
    block_first_time("b")
    log("bg_b done")
    return {"b": state["draft"] + "-b"}


def main_step(state: dict[str, Any]) -> dict[str, Any]:
    block_first_time("main")
    log("main done")
    return {"main": 1}


def final(state: dict[str, Any]) -> dict[str, Any]:
    log("final")
    return {"final": [state["a"], state["b"], state["main"]]}


def on_complete(name: str, result: dict[str, Any]) -> None:
    log(f"cb {name}")


def queued_one(state: dict[str, Any]) -> dict[str, Any]:
    return {"one_pid": os.getpid()}


def queued_two(state: dict[str, Any]) -> dict[str, Any]:
    return {"two_pid": os.getpid()}


app = App("dispatch-procs", DB, executor_id={"web": "web-a", "worker": "worker-b"}.get(ROLE))
crash = app.pipeline("crash", fn(writer) >> dispatch(fn(bg_a), fn(bg_b), on_complete=on_complete)
                     >> fn(main_step) >> join() >> fn(final))
queued = app.pipeline("queued", dispatch(fn(queued_one), fn(queued_two), queue="bg") >> join())

if ROLE == "web":
    app.listen_queues()
if ROLE in ("crash", "web"):
    with app:
        if ROLE == "crash" and PHASE == "1":
            crash.start({}, run_id="crash-1")
            time.sleep(600)
        handle = (app.get_run("crash-1") if ROLE == "crash"
                  else queued.start({}, run_id="queued-1"))
        print("STATE " + json.dumps(handle.result(timeout=60).state), flush=True)
elif ROLE == "worker":
    with app:
        (DIR / "ready").write_text("x")
        while not (DIR / "stop").exists():
            time.sleep(0.05)
