"""A budgeted run whose six agent tasks run on a queue served by two worker processes.

Usage: budget_procs.py URL LOG EXECUTOR worker   serve queue ``agents`` (one task at a
                                                 time) until LOG.stop exists
       budget_procs.py URL LOG EXECUTOR run      start run ``procs-1`` (max_tokens=22),
                                                 dequeue nothing, print how it ended
Each task first logs ``start PID ITEM`` and waits until tasks have started in two
processes (so the two workers' agents reach the budget at the same time), then asks the
model, which logs ``call PID ITEM START END``. A call is 7 tokens.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from durapipe import Agent, App, BudgetExceeded, dispatch, fn, join
from durapipe.models import FakeModel, ModelRequest

url, log, executor, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
ITEMS = "abcdef"


def write(line: str) -> None:
    with log.open("a") as f:
        f.write(line + "\n")


def meet_for(item: str) -> Any:
    def meet(state: dict[str, Any]) -> dict[str, Any]:
        write(f"start {os.getpid()} {item}")
        deadline = time.time() + 30
        while time.time() < deadline:
            starts = [ln.split() for ln in log.read_text().splitlines() if ln.startswith("start")]
            if len({s[1] for s in starts}) >= 2:
                break
            time.sleep(0.01)
        return {}

    meet.__name__ = f"meet_{item}"
    return meet


async def answer(request: ModelRequest) -> str:
    start = time.time()
    for _ in range(20):  # a window in which a call in the other process could start
        await asyncio.sleep(0.005)
    write(f"call {os.getpid()} {request.prompt.split()[-1].rstrip('.')} {start:.6f} "
          f"{time.time():.6f}")
    return "four words of output"


app = App("budget-procs", url, model=FakeModel({"w": answer}), executor_id=executor)
app.queue("agents", worker_concurrency=1, polling_interval=0.05)
tasks = [fn(meet_for(k), name=f"meet_{k}") >> Agent("w").instruct(f"Write about {{{k}}}.")
         .writes(f"t{k}") for k in ITEMS]
pipeline = app.pipeline("tasks", dispatch(*tasks, names=list(ITEMS), queue="agents") >> join())

if __name__ == "__main__":
    if mode == "run":
        app.listen_queues()  # the two workers run the tasks
    with app:
        if mode == "worker":
            print("ready", flush=True)
            while not Path(f"{log}.stop").exists():
                time.sleep(0.05)
        else:
            handle = pipeline.start({k: k for k in ITEMS}, run_id="procs-1", max_tokens=22)
            try:
                handle.result(timeout=90)
                print("NO BUDGET ERROR", flush=True)
            except BudgetExceeded as exc:
                print(f"BUDGET used={exc.used} max={exc.max_tokens} {exc}", flush=True)
