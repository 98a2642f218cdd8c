"""Many runs of a pipeline with parallel branches; the process SIGKILLs itself mid-flight.

Usage: kill_pipeline.py DATABASE_URL LOG_PATH RUNS KILL_AT
Each step appends ``run:label`` to the log after its work. KILL_AT is a number N or a
``run:label``: the process starts RUNS runs and kills itself with SIGKILL right after the
N-th log line, or that step's line (before DBOS records that step). With KILL_AT = 0 it
recovers, starts the same run ids again (idempotent) and waits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from side_effects import KillingLog, start_then_die_or_finish

from durapipe import App

url, log, runs, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
step = KillingLog(log, kill_at).step


LABELS = ["a", "b1", "b2", "c", "d1", "d2", "e"]
app = App("kill-app", url)
pipeline = app.pipeline(
    "branches",
    step("a") >> ((step("b1") >> step("b2")) | step("c") | (step("d1") >> step("d2"))) >> step("e"),
)

if __name__ == "__main__":
    with app:
        start_then_die_or_finish(pipeline, runs, "k", kill_at, LABELS)
        print("ALL DONE", flush=True)
