"""Tenants across two worker processes, a cron schedule across a SIGKILL and restart, and a
delayed start across a restart.

A big tenant's backlog does not hold up a small tenant, and no tenant ever has more runs
in flight than its limit (timestamps written by the steps themselves); the schedule fires
every tick exactly once, the ticks missed while no worker ran included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dbutil import lines, most_at_once, sql, wait_for, wait_for_idle_database
from durapipe import App, fn
from ops import tenants_app

TESTS = Path(__file__).parent


def worker(url: str, executor: str, env: dict[str, str] | None = None,
           wait: bool = True) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "durapipe.cli", "worker", "ops.tenants_app", "--executor-id",
         executor, "--database-url", url],
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}),
                 PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        ready(proc)
    return proc


def ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "ready" in line, line + proc.stdout.read()


@pytest.mark.slow
def test_small_tenant_is_not_held_up_by_a_big_one(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    workers = [worker(database_url, "w1", wait=False), worker(database_url, "w2", wait=False)]
    app = tenants_app.app
    app.database_url = database_url
    app.listen_queues()  # this process only enqueues; the two workers run the queue
    try:
        with app:  # launched while the workers start
            for w in workers:
                ready(w)
            for i in range(200):
                tenants_app.work_pipeline.enqueue(
                    {"tenant": "A", "i": i, "log": str(log)}, queue="tenants", tenant="A")
            small = [tenants_app.work_pipeline.enqueue(
                {"tenant": "B", "i": i, "log": str(log)}, queue="tenants", tenant="B")
                for i in range(5)]
            for h in small:
                h.result(timeout=60)
            done_a = sum(1 for ln in lines(log) if ln.startswith("A "))
            # Which worker wins a poll is up to the two processes; A's backlog keeps both busy
            # until each has run some of it, so the limit is checked across both.
            wait_for(lambda: len({ln.split()[4] for ln in lines(log)}) == 2, timeout=90,
                     what="runs on both workers")
    finally:
        app.shutdown()
        app._listen = None
        for w in workers:
            w.kill()
            w.wait()
    assert done_a < 100, f"{done_a} of A's 200 runs finished before B's 5"
    rows = [ln.split() for ln in lines(log)]
    spans = {t: [(float(r[2]), float(r[3])) for r in rows if r[0] == t] for t in "AB"}
    assert len(spans["B"]) == 5
    assert most_at_once(spans["A"]) == 2  # at its limit, never past it
    assert most_at_once(spans["B"]) <= 2
    assert most_at_once(spans["A"] + spans["B"]) <= 4  # the queue's own limit
    assert len({r[4] for r in rows}) == 2  # both workers ran the queue
    recorded = sql(database_url, "SELECT attributes->>'durapipe.tenant', queue_partition_key, "
                                 "count(*) FROM dbos.workflow_status WHERE name LIKE 'durapipe.run:%' "
                                 "GROUP BY 1, 2 ORDER BY 1")
    assert recorded == [("A", "A", 200), ("B", "B", 5)]


def _ticks(url: str) -> list[datetime]:
    rows = sql(url, "SELECT workflow_uuid, status FROM dbos.workflow_status "
                    "WHERE name LIKE 'durapipe.run:%' AND workflow_uuid LIKE 'every-second@%'")
    return sorted(datetime.fromisoformat(r[0].split("@", 1)[1]) for r in rows)


@pytest.mark.slow
def test_schedule_fires_every_tick_once_across_a_restart(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "ticks"
    env = {"TICK_LOG": str(log)}
    first = worker(database_url, "sched-1", env)
    try:
        wait_for(lambda: len(lines(log)) >= 2, timeout=60, what="two ticks")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    wait_for_idle_database(database_url)
    killed_at = time.time()
    time.sleep(2.0)  # ticks missed while no worker runs: the next launch fires them
    second = worker(database_url, "sched-1", env)
    try:
        wait_for(lambda: bool(_ticks(database_url)) and _ticks(database_url)[-1].timestamp()
                 > killed_at + 3, timeout=60, what="ticks after the restart")
        wait_for(lambda: sql(database_url, "SELECT count(*) FROM dbos.workflow_status WHERE "
                             "name LIKE 'durapipe.run:%' AND status <> 'SUCCESS'") == [(0,)],
                 timeout=30, what="every tick's run to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait()
    ticks = _ticks(database_url)
    # One run per tick, every second from the first tick to the last: none lost while the
    # process was dead, none twice.
    assert ticks == [ticks[0] + timedelta(seconds=i) for i in range(len(ticks))]
    assert len(ticks) >= 5
    # Each run's step ran once (a run in flight at the kill may have run it twice).
    assert len(ticks) <= len(lines(log)) <= len(ticks) + 1


def stamp(state: dict[str, object]) -> dict[str, object]:
    return {"at": time.time()}


def test_delayed_start_survives_a_restart(database_url: str) -> None:
    def build() -> tuple[App, Any]:
        app = App("delay-app", database_url)
        return app, app.pipeline("p", fn(stamp, name="stamp"))

    app, p = build()
    with app:
        started = time.time()
        handle = p.start(delay=1.5, tenant="acme")
        assert handle.status().value == "DELAYED"
    # The process that started it is gone; a new one runs it when the delay is up.
    app, p = build()
    with app:
        result = app.get_run(handle.run_id).result(timeout=30)
    assert result.state["at"] >= started + 1.5
    assert sql(database_url, "SELECT attributes->>'durapipe.tenant' FROM dbos.workflow_status "
                             "WHERE workflow_uuid = %s", handle.run_id) == [("acme",)]
