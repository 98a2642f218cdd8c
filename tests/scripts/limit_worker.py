"""A worker process of an app whose steps share concurrency limits.

Usage:
  limit_worker.py URL LOG EXECUTOR run PREFIX N   start N runs of ``shared`` (limit 2) and
                                                  wait; each limited step appends
                                                  ``pid start end`` to LOG
  limit_worker.py URL LOG EXECUTOR hold           start run ``held`` of ``solo`` (limit 1),
                                                  whose step logs ``holding`` and never ends
  limit_worker.py URL LOG EXECUTOR solo RUN_ID    run RUN_ID of ``solo`` and wait
Set DURAPIPE_LIMIT_LEASE for short slot leases.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from durapipe import App, fn, limit

url, log, executor, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]


def write(line: str) -> None:
    with log.open("a") as f:
        f.write(line + "\n")


def work(state: dict[str, Any]) -> dict[str, Any]:
    start = time.time()
    time.sleep(0.2)
    write(f"{os.getpid()} {start:.6f} {time.time():.6f}")
    return {"done": True}


def solo_step(state: dict[str, Any]) -> dict[str, Any]:
    if state.get("hold"):
        write("holding")
        time.sleep(600)
    write(f"solo {time.time():.6f}")
    return {"done": True}


app = App("limit-app", url, executor_id=executor)
shared = app.pipeline("shared", limit("shared", fn(work), concurrency=2))
solo = app.pipeline("solo", limit("solo", concurrency=1)(fn(solo_step)))

if __name__ == "__main__":
    with app:
        if mode == "run":
            prefix, n = sys.argv[5], int(sys.argv[6])
            # Both workers start their runs once both are up, so their runs overlap.
            Path(f"{log}.ready.{executor}").touch()
            deadline = time.time() + 60
            while len(list(log.parent.glob(log.name + ".ready.*"))) < 2 and time.time() < deadline:
                time.sleep(0.02)
            handles = [shared.start({}, run_id=f"{prefix}{i}") for i in range(n)]
            for h in handles:
                h.result(timeout=120)
        elif mode == "hold":
            solo.start({"hold": True}, run_id="held")
            time.sleep(600)
        else:
            solo.run({}, run_id=sys.argv[5])
        print("ALL DONE", flush=True)
