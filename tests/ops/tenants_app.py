"""Tenants test app: a queue with a per-tenant limit, and a pipeline on a cron schedule.

``work`` appends ``<tenant> <i> <start> <end> <pid>`` to ``state["log"]`` around a short
sleep, so a test can tell how many runs of a tenant were in flight at once, across worker
processes. With TICK_LOG set, ``tick`` is scheduled every second and appends a line per run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from durapipe import App, fn

app = App("ops-tenants")
app.queue("tenants", concurrency=4, per_tenant=2, polling_interval=0.05)


def work(state: dict[str, Any]) -> dict[str, Any]:
    start = time.time()
    time.sleep(0.4)
    with open(state["log"], "a") as f:
        f.write(f"{state['tenant']} {state['i']} {start:.6f} {time.time():.6f} {os.getpid()}\n")
    return {"done": True}


def tick(state: dict[str, Any]) -> dict[str, Any]:
    with open(state["log"], "a") as f:
        f.write(f"{state['log']} {time.time():.6f}\n")
    return {}


work_pipeline = app.pipeline("work", fn(work, name="work"))
tick_pipeline = app.pipeline("tick", fn(tick, name="tick"))
if os.environ.get("TICK_LOG"):
    tick_pipeline.schedule("* * * * * *", {"log": os.environ["TICK_LOG"]}, name="every-second")
