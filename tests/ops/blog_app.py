"""A small app the CLI and SQL tests run: agents, a parallel branch (steps of the run), a
step that counts its executions in a file, and a pipeline that fails."""

from __future__ import annotations

import os
import threading
from typing import Any

from durapipe import Agent, App, FakeModel, fn

app = App("ops-blog", model=FakeModel({"writer": lambda r: f"a post on {r.prompt}", "editor": "looks good"}))
release = threading.Event()  # tests hold `hold` runs in their first step until this is set


def count(state: dict[str, Any]) -> dict[str, Any]:
    return {"words": len(state["draft"].split())}


def double(state: dict[str, Any]) -> dict[str, Any]:
    return {"twice": state["words"] * 2}


def finish(state: dict[str, Any]) -> dict[str, Any]:
    log = state.get("log")
    if log:
        with open(log, "a") as f:
            f.write("finish\n")
    return {"done": True}


def explode(state: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("no luck today")


def wait_for_release(state: dict[str, Any]) -> dict[str, Any]:
    with open(state["log"], "a") as f:
        f.write("hold-start\n")
    release.wait(float(os.environ.get("OPS_HOLD_SECONDS", "30")))
    return {"held": True}


writer = Agent("writer").instruct("{topic}").writes("draft")
publish = app.pipeline(
    "publish",
    writer >> (Agent("editor").writes("review") | (fn(count) >> fn(double))) >> fn(finish),
)
broken = app.pipeline("broken", fn(explode))
hold = app.pipeline("hold", fn(wait_for_release) >> fn(finish))
