"""One app in several code versions, for the deploy tests (tests/test_deploys.py).

The code version comes from ``DEPLOY_CODE``:

- ``v1``: one >> two >> gate "legal" >> agent writer ("Write about {topic}.") >> three
- ``v2-later``: v1 with a node added after the gate and the writer's prompt edited
- ``v2-early``: v1 with node one changed (it reads another key)
- ``patched``: v1 whose node three is replaced for runs started by this code only
- ``none``: no pipeline at all (a process of the app that only reads through handles)

Every function step appends ``<step>:<run>`` to the file in state["log"]. With
``DEPLOY_BLOCK`` set to ``<step>:<run>`` and ``DEPLOY_MARKER`` to a path, that step of that
run writes the marker and blocks (the kill point). ``DEPLOY_EXECUTOR`` sets the executor id.
Run as a script (``python deploy_app.py RUN_ID...``, e.g. under ``dbos start``), it starts
the runs and serves until killed.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from durapipe import Agent, App, FakeModel, fn, gate, patched

CODE = os.environ.get("DEPLOY_CODE", "v1")


def log(state: dict[str, Any], step: str) -> None:
    with open(state["log"], "a") as f:
        f.write(f"{step}:{state['run']}\n")
    if os.environ.get("DEPLOY_BLOCK") == f"{step}:{state['run']}":
        with open(os.environ["DEPLOY_MARKER"], "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(1)


def one(state: dict[str, Any]) -> dict[str, Any]:
    log(state, "one")
    return {"one": True}


def two(state: dict[str, Any]) -> dict[str, Any]:
    log(state, "two")
    return {"two": True}


def added(state: dict[str, Any]) -> dict[str, Any]:
    log(state, "added")
    return {"added": True}


def three(state: dict[str, Any]) -> dict[str, Any]:
    log(state, "three")
    return {"three": "old"}


def three_v2(state: dict[str, Any]) -> dict[str, Any]:
    log(state, "three_v2")
    return {"three": "new"}


def echo(request: Any) -> str:
    return f"[{request.prompt}]"


prompt = "Write a poem about {topic}." if CODE == "v2-later" else "Write about {topic}."
writer = Agent("writer", model=FakeModel(echo)).instruct(prompt).writes("draft")
first = fn(one, reads=["topic"] if CODE == "v2-early" else None)
nodes: Any = first >> fn(two) >> gate("legal", "Publish {topic}?")
if CODE == "v2-later":
    nodes = nodes >> fn(added)
last: Any = patched("three-v2", new=fn(three_v2), old=fn(three)) if CODE == "patched" else fn(three)
nodes = nodes >> writer >> last

app = App("deploys", executor_id=os.environ.get("DEPLOY_EXECUTOR"))
flow = app.pipeline("flow", nodes) if CODE != "none" else None


def main(run_ids: list[str]) -> None:
    with app:
        for run_id in run_ids:
            assert flow is not None
            flow.start({"topic": run_id, "run": run_id, "log": os.environ["DEPLOY_LOG"]},
                       run_id=run_id)
        print("STARTED", flush=True)
        while True:
            time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1:])
