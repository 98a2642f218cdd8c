"""A 5-step pipeline whose steps append to a side-effect log; step 4 blocks on the first run.

Usage: crash_pipeline.py DATABASE_URL LOG_PATH MODE
MODE: "crash" blocks at step 4; "recover" does not; "changed" recovers with a sixth step added.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from durapipe import App, fn

url, log, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


def make_step(i: int) -> Any:
    def step(state: dict[str, Any]) -> dict[str, Any]:
        if i == 4 and mode == "crash":
            with log.open("a") as f:
                f.write("blocked-at-4\n")
            time.sleep(3600)  # the test SIGKILLs the process here
        with log.open("a") as f:
            f.write(f"step{i}\n")
        return {f"s{i}": i}

    step.__name__ = f"step{i}"
    return fn(step)


app = App("crash-app", url)
steps = make_step(1) >> make_step(2) >> make_step(3) >> make_step(4) >> make_step(5)
pipeline = app.pipeline("five", steps >> make_step(6) if mode == "changed" else steps)

if __name__ == "__main__":
    with app:
        if mode == "crash":
            pipeline.start({"start": True}, run_id="crash-run")
            time.sleep(3600)
        else:
            try:
                result = app.get_run("crash-run").result(timeout=60)
                print("RESULT", sorted(result.state.items()), flush=True)
            except Exception as exc:
                print("ERROR", type(exc).__name__, exc, flush=True)
