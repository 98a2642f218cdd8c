"""Workers test app: three steps that log to a file; in a process started with
OPS_BLOCK_MARKER set, step two writes that marker and blocks (the kill point)."""

from __future__ import annotations

import os
import time
from typing import Any

from durapipe import App, fn

app = App("ops-workers")
jobs = app.queue("jobs", worker_concurrency=1, limit=50, period=1.0)


def log(state: dict[str, Any], line: str) -> None:
    with open(state["log"], "a") as f:
        f.write(f"{line} {os.getpid()} {time.time():.6f}\n")


def one(state: dict[str, Any]) -> dict[str, Any]:
    log(state, f"one:{state['job']}")
    return {"one": True}


def two(state: dict[str, Any]) -> dict[str, Any]:
    log(state, f"two-start:{state['job']}")
    marker = os.environ.get("OPS_BLOCK_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write("blocked")
        while True:
            time.sleep(1)
    log(state, f"two-done:{state['job']}")
    return {"two": True}


def three(state: dict[str, Any]) -> dict[str, Any]:
    log(state, f"three:{state['job']}")
    return {"three": True}


steps = app.pipeline("steps", fn(one) >> fn(two) >> fn(three))
