"""A flow run for the crash test: ``python flow_crash_script.py <db-url> <log> first|again``.

``first`` starts run ``crash-1``; steps c and d log their start and then block forever,
so the test can SIGKILL the process with a and b done and c and d in flight. ``again``
launches the same app (recovering the run) and waits for the result.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from durapipe import App, Flow, Step

URL, LOG, MODE = sys.argv[1], sys.argv[2], sys.argv[3]


def log(line: str) -> None:
    with open(LOG, "a") as f:
        f.write(line + "\n")


def step(name: str, key: str, block: bool = False) -> Any:
    async def run(state: dict[str, Any]) -> dict[str, Any]:
        log(f"{name} start")
        if block and MODE == "first":
            await asyncio.sleep(3600)
        await asyncio.sleep(0.05)
        log(f"{name} end")
        return {key: name}

    run.__name__ = run.__qualname__ = f"step_{name}"
    return run


flow = Flow(goals=["e"], steps=[
    Step("a", step("a", "ka"), needs=["x"], outputs=["ka"]),
    Step("b", step("b", "kb"), needs=["x"], outputs=["kb"]),
    Step("c", step("c", "kc", block=True), needs=["x"], outputs=["kc"]),
    Step("d", step("d", "kd", block=True), needs=["x"], outputs=["kd"]),
    Step("e", step("e", "e"), needs=["ka", "kb", "kc", "kd"], outputs=["e"]),
])
app = App("flow-crash", URL)
pipeline = app.pipeline("crash", flow, inputs=["x"])

if __name__ == "__main__":
    with app:
        if MODE == "first":
            pipeline.start({"x": 1}, run_id="crash-1")
            time.sleep(3600)
        state = app.get_run("crash-1").result(timeout=60).state
        print("RESULT " + json.dumps(state, sort_keys=True), flush=True)
