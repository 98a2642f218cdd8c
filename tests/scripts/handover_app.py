"""Processes of one app that register different pipelines (tests/test_handover.py).

Usage: handover_app.py ROLE DATABASE_URL LOG EXECUTOR_ID [RUN_ID PIPELINE]
ROLE ``worker`` registers pipelines ``slow`` and ``other``; ``bare`` registers none (a
process that only reads through handles); ``some`` registers only ``other``. A worker
also registers ``line`` (the same steps in a row); given RUN_ID it starts that run of
PIPELINE. Every step appends ``label:run pid`` to LOG
after its work; step ``two`` first appends ``two-start`` and then waits while the file
``LOG.hold`` exists. The branch ``two >> nap`` runs as a child workflow of the run.
Each process prints ``ready`` once launched, then serves until it is killed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from durapipe import App, fn, sleep

role, url, log, executor = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
run_id, pipeline = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else (None, "")
hold = Path(f"{log}.hold")


def note(state: dict[str, Any], label: str) -> None:
    with open(log, "a") as f:
        f.write(f"{label}:{state['run']} {os.getpid()}\n")


def one(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "one")
    return {"one": 1}


def two(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "two-start")
    while hold.exists():
        time.sleep(0.05)
    note(state, "two")
    return {"two": 2}


def side(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "side")
    return {"side": 3}


def three(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "three")
    return {"three": 4}


def echo(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "echo")
    return {}


app = App("handover-app", url, executor_id=executor)
if role == "worker":
    pipelines = {
        "slow": app.pipeline("slow", fn(one) >> ((fn(two) >> sleep(0.01)) | fn(side)) >> fn(three)),
        "line": app.pipeline("line", fn(one) >> fn(two) >> fn(side) >> fn(three)),
    }
if role in ("worker", "some"):
    app.pipeline("other", fn(echo))

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("durapipe.handover").setLevel(logging.INFO)
    with app:
        if run_id is not None:
            pipelines[pipeline].start({"run": run_id}, run_id=run_id)
        print("ready", flush=True)
        while True:
            time.sleep(1)
