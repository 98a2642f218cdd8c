"""Starts made by a process of their own, for tests of dedup across processes and of a
delayed start across a crash.

Usage: start_procs.py dedup DATABASE_URL GO_FILE RELEASE_FILE EXECUTOR_ID
    prints "ready", waits for GO_FILE, starts a run with dedup_key "order-7" from 20 threads
    at once, prints "ids <the run ids they got>", and once RELEASE_FILE exists (the run
    waits for it too) waits for the run to finish.
Usage: start_procs.py delay DATABASE_URL
    starts run "late-1" of tenant "acme" with delay=2, prints "started <time>", and
    sleeps until the test SIGKILLs it.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from durapipe import App, fn


def hold(state: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while not Path(state["release"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"released": True}


def stamp(state: dict[str, Any]) -> dict[str, Any]:
    return {"at": time.time()}


def dedup(url: str, go: Path, release: Path, executor: str) -> None:
    app = App("dedup-procs", url, executor_id=executor)
    pipeline = app.pipeline("p", fn(hold, name="hold"))
    with app:
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        ids: list[str] = []

        def start() -> None:
            ids.append(pipeline.start({"release": str(release)}, dedup_key="order-7").run_id)

        threads = [threading.Thread(target=start) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("ids", *sorted(set(ids)), flush=True)
        for run_id in set(ids):
            app.get_run(run_id).result(timeout=90)


def delay(url: str) -> None:
    app = App("delay-app", url)
    pipeline = app.pipeline("p", fn(stamp, name="stamp"))
    with app:
        before = time.time()
        pipeline.start(delay=2, tenant="acme", run_id="late-1")
        print("started", before, flush=True)
        time.sleep(60)


if __name__ == "__main__":
    if sys.argv[1] == "dedup":
        dedup(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
    else:
        delay(sys.argv[2])
