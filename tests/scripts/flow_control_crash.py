"""Durable retries and best_of under SIGKILL: the test kills this process between steps.

Usage: flow_control_crash.py DATABASE_URL DIR CASE MODE
CASE "retry": fn(flaky, retry=Retry(attempts=3, backoff=1)) >> fn(done); flaky fails on its
first two executions (counted in DIR/effects.log) and succeeds on the third.
CASE "best": best_of(3, fn(cand), score=random) >> fn(after); candidate 2 waits for the file
DIR/go-cand, ``after`` for DIR/go-after; every execution appends a line to DIR/effects.log.
MODE "start" starts run "fc-<case>" and waits to be killed; "start-recovered" recovers it
(a new process with the same executor id) and waits to be killed; "finish" recovers it
and prints ``RESULT <json state>``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from durapipe import App, Retry, best_of, fn

url, folder, case, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
log = folder / "effects.log"


def effect(line: str) -> int:
    with log.open("a") as f:
        f.write(line + "\n")
    return sum(1 for x in log.read_text().splitlines() if x.startswith(line.split(" ")[0]))


def flaky(state: dict[str, Any]) -> dict[str, Any]:
    n = effect("flaky")
    if n < 3:
        raise ConnectionError(f"transient failure {n}")
    return {"flaky_calls": n}


def done(state: dict[str, Any]) -> dict[str, Any]:
    effect("done")
    return {"done": True}


def cand(state: dict[str, Any]) -> dict[str, Any]:
    i = state["candidate"]
    while i == 2 and not (folder / "go-cand").exists():
        time.sleep(0.02)
    effect(f"cand{i}")
    return {"value": random.random(), "who": i}


def after(state: dict[str, Any]) -> dict[str, Any]:
    while not (folder / "go-after").exists():
        time.sleep(0.02)
    effect("after")
    return {"after": True}


def random_score(state: dict[str, Any]) -> float:
    return random.random()  # not deterministic on purpose: a replay must not call it again


app = App("flow-control-crash", url)
retrying = app.pipeline("retrying", fn(flaky, retry=Retry(attempts=3, backoff=1.0, jitter=0))
                        >> fn(done))
best = app.pipeline("best", best_of(3, fn(cand), score=random_score) >> fn(after))

if __name__ == "__main__":
    with app:
        run_id = f"fc-{case}"
        if mode == "start":
            (retrying if case == "retry" else best).start({}, run_id=run_id)
        if mode in ("start", "start-recovered"):  # recovered at launch; runs until killed
            time.sleep(3600)  # the test SIGKILLs the process
        else:
            result = app.get_run(run_id).result(timeout=60)
            print("RESULT", json.dumps(result.state), flush=True)
