"""A worker for the crash tests of gates, sleep, timeout and race.

Usage: crash_control.py DATABASE_URL MODE LOG PHASE
MODE is gate | gate-answered | gate-answered-now | sleep | timeout | race; PHASE is "first" (the process that gets killed),
"second" (the restarted process, which recovers the run and finishes it), "resume" (the same
without answering the gate, which was answered while no process ran) or "third"
(one more restart, to see that nothing comes back). Every step appends
``<what> <epoch seconds>`` to LOG, so the test reads what ran, how often and when.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

from durapipe import App, fn, gate, race, sleep

url, mode, log, phase = sys.argv[1:5]
S = dict[str, Any]


def note(what: str) -> None:
    with open(log, "a") as f:
        f.write(f"{what} {time.time():.6f}\n")


def stamp(what: str) -> Any:
    def step(state: S) -> S:
        note(what)
        return {what: True}
    step.__name__ = what
    return fn(step)


async def slow(state: S) -> S:
    note("slow-start")
    await asyncio.sleep(1000)
    return {"slow": True}


async def fast_on_restart(state: S) -> S:
    note("a-start")
    if phase == "first":
        await asyncio.sleep(1000)
    return {"winner": "a"}


def held(state: S) -> S:
    """After the gate of mode gate-answered: blocks forever in the first process. In mode
    gate-answered-now it kills that process at once, inside the few milliseconds before
    the run records the decision itself (``DEFER_SECONDS``)."""
    note("held-start")
    if phase == "first" and mode == "gate-answered-now":
        os.kill(os.getpid(), signal.SIGKILL)
    if phase == "first":
        time.sleep(3600)
    note("held")
    return {"held": True}


PIPELINES = {
    "gate-answered": stamp("draft") >> gate("legal", "publish {topic}?") >> fn(held),
    "gate-answered-now": stamp("draft") >> gate("legal", "publish {topic}?") >> fn(held),
    "gate": stamp("draft") >> gate("legal", "publish {topic}?") >> stamp("publish"),
    "sleep": stamp("t0") >> sleep(4) >> stamp("t1"),
    "timeout": stamp("t0") >> (fn(slow).timeout(4) // stamp("t1")),
    "race": race(fn(fast_on_restart), sleep(3600) >> stamp("b_done")),
}

app = App("crash-app", url)
pipeline = app.pipeline(mode, PIPELINES[mode])

note(f"process-{phase}")
with app:
    if phase == "first":
        if mode == "gate-answered":
            # The run's own record of the decision waits: the kill comes before it.
            from durapipe.engine import context
            context.DEFER_SECONDS = 3600
        pipeline.start({"topic": "ai"}, run_id="crash-1")
        if mode == "gate":
            while not app.pending("crash-1"):
                time.sleep(0.02)
            note("waiting")
        if mode in ("gate-answered", "gate-answered-now"):
            while not app.pending("crash-1"):
                time.sleep(0.02)
            app.approve("crash-1", "legal", by="alice", comment="go")
        time.sleep(3600)  # killed here
    elif phase in ("second", "resume"):  # resume: the gate was answered while no process ran
        if mode == "gate" and phase == "second":
            while not app.pending("crash-1"):
                time.sleep(0.02)
            app.approve("crash-1", "legal", by="alice")
        result = app.get_run("crash-1").result(timeout=60)
        note("result " + ",".join(sorted(result.state)))
    else:
        time.sleep(1.0)  # recovery would have restarted anything left PENDING by now
note(f"exit-{phase}")
sys.stdout.flush()
os._exit(0)  # do not wait for cancelled coroutines that are still asleep
