"""Many runs of a pipeline with dispatch, parallel branches and a gate; SIGKILL mid-flight.

Usage: kill_mixed.py DATABASE_URL LOG_PATH RUNS KILL_AT
Pipeline: a >> dispatch(b1 >> b2, names=["bg"]) >> (c | (d1 >> d2)) >> gate("ok") >> join() >> e.
Each fn step appends ``run:label`` to the log after its work. An approver thread answers
every waiting gate. KILL_AT is a number N or a ``run:label``: the process kills itself with
SIGKILL right after the N-th log line, or that step's line (before DBOS records that step).
With KILL_AT = 0 it recovers, starts the same run ids again (idempotent), answers the gates
and waits for every run.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from side_effects import KillingLog, start_then_die_or_finish

from durapipe import App, DurapipeError, dispatch, gate, join

url, log, runs, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
step = KillingLog(log, kill_at).step


LABELS = ["a", "b1", "b2", "c", "d1", "d2", "e"]
app = App("kill-mixed", url)
pipeline = app.pipeline(
    "mixed",
    step("a") >> dispatch(step("b1") >> step("b2"), names=["bg"])
    >> (step("c") | (step("d1") >> step("d2"))) >> gate("ok", "approve {run}?") >> join() >> step("e"),
)
stop = threading.Event()


def approver() -> None:
    while not stop.is_set():
        try:
            for pending in app.pending():
                try:
                    app.approve(pending.run_id, pending.gate, by="bot")
                except DurapipeError:
                    pass  # answered meanwhile
        except Exception:
            pass  # the app is shutting down
        time.sleep(0.05)


if __name__ == "__main__":
    with app:
        threading.Thread(target=approver, daemon=True).start()
        start_then_die_or_finish(pipeline, runs, "m", kill_at, LABELS)
        stop.set()
        print("ALL DONE", flush=True)
