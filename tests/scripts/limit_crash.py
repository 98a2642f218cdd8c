"""Runs whose middle part holds a limit of one; the process SIGKILLs itself mid-flight.

Usage: limit_crash.py DATABASE_URL LOG_PATH RUNS KILL_AT (see kill_pipeline.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from side_effects import KillingLog, start_then_die_or_finish

from durapipe import App, limit

url, log, runs, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
step = KillingLog(log, kill_at).step

LABELS = ["a", "b", "c", "d"]
app = App("limit-crash", url)
pipeline = app.pipeline("limited", step("a") >> limit("k", step("b") >> step("c"), concurrency=1)
                        >> step("d"))

if __name__ == "__main__":
    with app:
        start_then_die_or_finish(pipeline, runs, "k", kill_at, LABELS)
        print("ALL DONE", flush=True)
