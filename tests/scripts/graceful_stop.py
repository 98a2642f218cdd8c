"""Runs caught mid-flight by a clean stop of their process, then resumed by the next one.

Usage: graceful_stop.py DATABASE_URL LOG PHASE MODE
PHASE "first" starts five runs (one waits at a gate, one sleeps, one is in an async step,
one in a sync step, one has a dispatched task in flight), waits until each is there, and
stops the process the way MODE says: ``exit`` (leave ``with app:``), ``shutdown``
(``app.shutdown()``), ``drain`` (``app.shutdown(drain=4)``), ``lifespan`` (leave ``async
with app:``), ``uvicorn`` (a FastAPI service whose lifespan holds the App, stopped by the
SIGTERM the test sends). PHASE "second" launches again with the same executor id, approves
the gate and waits for every run to end. Every step appends ``<label> <epoch>`` to LOG.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from durapipe import App, dispatch, fn, gate, join, sleep

url, log, phase, mode = sys.argv[1:5]
S = dict[str, Any]
SLOW = 1.0 if mode == "drain" else 6.0


def note(what: str) -> None:
    with open(log, "a") as f:
        f.write(f"{what} {time.time():.6f}\n")


def stamp(what: str) -> Any:
    def step(state: S) -> S:
        note(what)
        return {what: True}
    step.__name__ = what
    return fn(step)


async def slow_async(state: S) -> S:
    note("async-start")
    await asyncio.sleep(SLOW)
    note("async-end")
    return {"async": True}


def slow_sync(state: S) -> S:
    note("sync-start")
    time.sleep(SLOW if mode == "drain" else 1.5)
    note("sync-end")
    return {"sync": True}


async def task_body(state: S) -> S:
    note("task-start")
    await asyncio.sleep(SLOW)
    note("task-end")
    return {"task": True}


app = App("stop-app", url)
PIPES = {
    "gate": app.pipeline("gate", stamp("g0") >> gate("ok", "go?") >> stamp("g1")),
    "sleep": app.pipeline("sleep", stamp("s0") >> sleep(5) >> stamp("s1")),
    "async": app.pipeline("async", stamp("a0") >> fn(slow_async) >> stamp("a1")),
    "sync": app.pipeline("sync", stamp("y0") >> fn(slow_sync) >> stamp("y1")),
    "task": app.pipeline("task", stamp("d0") >> dispatch(fn(task_body), names=["t"])
                         >> stamp("d1") >> join("t") >> stamp("d2")),
}
IN_PLACE = ["g0", "s0", "async-start", "sync-start", "task-start"]


def seen() -> set[str]:
    try:
        with open(log) as f:
            return {line.rsplit(" ", 1)[0] for line in f}
    except FileNotFoundError:
        return set()


def wait_in_place() -> None:
    deadline = time.monotonic() + 60
    while not set(IN_PLACE) <= seen() or not app.pending("r-gate"):
        assert time.monotonic() < deadline, f"runs never got in place: {seen()}"
        time.sleep(0.02)


async def wait_in_place_async() -> None:
    await asyncio.to_thread(wait_in_place)


def first_sync() -> None:
    if mode == "exit":
        with app:
            for name, p in PIPES.items():
                p.start({}, run_id=f"r-{name}")
            wait_in_place()
        return
    app.launch()
    for name, p in PIPES.items():
        p.start({}, run_id=f"r-{name}")
    wait_in_place()
    app.shutdown(drain=4 if mode == "drain" else 0)


async def first_lifespan() -> None:
    async with app:
        for name, p in PIPES.items():
            await p.start_async({}, run_id=f"r-{name}")
        await wait_in_place_async()


def first_uvicorn() -> None:
    import uvicorn
    from fastapi import FastAPI

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with app:
            for name, p in PIPES.items():
                await p.start_async({}, run_id=f"r-{name}")
            yield

    api = FastAPI(lifespan=lifespan)
    uvicorn.run(api, host="127.0.0.1", port=0, log_level="warning")


def second() -> None:
    with app:
        while not app.pending("r-gate"):
            time.sleep(0.02)
        app.approve("r-gate", "ok", by="test")
        for name in PIPES:
            result = app.get_run(f"r-{name}").result(timeout=90)
            print("RESULT", name, result.status.value, flush=True)


if __name__ == "__main__":
    note(f"process-{phase}")
    if phase == "second":
        second()
    elif mode == "lifespan":
        asyncio.run(first_lifespan())
    elif mode == "uvicorn":
        first_uvicorn()
    else:
        first_sync()
    print("DONE", phase, flush=True)
