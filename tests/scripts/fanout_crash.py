"""Several runs of a fan-out of 4 branches x 3 steps (plus transforms), with random sleeps.

Usage: fanout_crash.py DATABASE_URL LOG_PATH MODE SEED
MODE "crash": start RUNS runs; in each, one step chosen by the seed writes a marker and
blocks forever (the test SIGKILLs the process). MODE "recover": wait for every run (DBOS
recovers them at launch) with other random sleeps, and print each result.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

from durapipe import App, fn, transform

url, log, mode, seed = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
RUNS, BRANCHES, STEPS = 6, 4, 3
rng = random.Random(seed * 1000 + (0 if mode == "crash" else 1))
delays = {(r, b, j): rng.random() * 0.03 for r in range(RUNS) for b in range(BRANCHES)
          for j in range(STEPS)}
blocked = {r: (rng.randrange(BRANCHES), rng.randrange(STEPS)) for r in range(RUNS)}


def write(line: str) -> None:
    with log.open("a") as f:
        f.write(line + "\n")


def step(b: int, j: int) -> Any:
    def body(state: dict[str, Any]) -> dict[str, Any]:
        r = state["run"]
        time.sleep(delays[(r, b, j)])
        if mode == "crash" and blocked[r] == (b, j):
            write(f"blocked {r}")
            time.sleep(3600)
        write(f"{r}:{b}.{j}")
        return {f"b{b}": state.get(f"b{b}", "") + str(j)} if j else {f"b{b}": str(j)}

    body.__name__ = f"b{b}s{j}"
    return fn(body)


def pre(state: dict[str, Any]) -> dict[str, Any]:
    write(f"{state['run']}:pre")
    return {"pre": True}


def join(state: dict[str, Any]) -> dict[str, Any]:
    write(f"{state['run']}:join")
    return {"joined": "".join(state[f"b{b}"] for b in range(BRANCHES))}


def branch(b: int) -> Any:
    mark = transform(lambda s, b=b: {f"t{b}": 1}, name=f"t{b}")
    return step(b, 0) >> mark >> step(b, 1) >> step(b, 2)


app = App("fanout-crash", url)
fanout = branch(0) | branch(1) | branch(2) | branch(3)
pipeline = app.pipeline("fanout", fn(pre) >> fanout >> fn(join))

if __name__ == "__main__":
    with app:
        if mode == "crash":
            for r in range(RUNS):
                pipeline.start({"run": r}, run_id=f"fan-{r}")
            time.sleep(3600)
        else:
            for r in range(RUNS):
                try:
                    res = app.get_run(f"fan-{r}").result(timeout=60)
                    print("RESULT", r, res.state["joined"], flush=True)
                except Exception as exc:
                    print("ERROR", r, type(exc).__name__, exc, flush=True)
