"""Tenants across two worker processes, a cron schedule across a SIGKILL, a restart and a
pause, a delayed start across a SIGKILL, and one dedup key started from two processes.

A big tenant's backlog does not hold up a small tenant, and no tenant ever has more runs
in flight than its limit (timestamps written by the steps themselves); the schedule fires
every tick exactly once, the ticks missed while no worker ran included, and none while it
is paused (across a restart too) or for the pause once resumed; 40 concurrent starts with
one dedup key in two processes give one run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dbutil import lines, most_at_once, spawn, sql, wait_for, wait_for_idle_database
from durapipe import App, fn
from durapipe.cli import cli
from ops import tenants_app

TESTS = Path(__file__).parent
SCRIPTS = TESTS / "scripts"


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


def ready(proc: subprocess.Popen[str], word: str = "ready", timeout: float = 90) -> list[str]:
    """Wait until the process prints a line with ``word`` in it; its output is read to
    the end (a worker whose pipe filled up would stop) into the list returned."""
    assert proc.stdout is not None
    stdout, got, seen = proc.stdout, [], threading.Event()

    def read() -> None:
        for line in stdout:
            got.append(line)
            if word in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(timeout), "".join(got) or "no output"
    return got


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


def _every_second(ticks: list[datetime]) -> bool:
    return ticks == [ticks[0] + timedelta(seconds=i) for i in range(len(ticks))]


def _settled(url: str) -> bool:
    """No tick's run, and no firing of a tick, is unfinished."""
    return sql(url, "SELECT count(*) FROM dbos.workflow_status WHERE (name LIKE 'durapipe.run:%' "
                    "OR name = 'durapipe.schedule') AND status IN ('ENQUEUED', 'PENDING')") == [(0,)]


def _schedules(url: str, *args: str) -> float:
    """Run ``durapipe schedules ARGS``; the time it returned."""
    res = CliRunner().invoke(cli, ["schedules", *args, "--database-url", url])
    assert res.exit_code == 0, res.output
    return time.time()


@pytest.mark.slow
def test_schedule_fires_every_tick_once_across_a_restart_and_a_pause(database_url: str,
                                                                     tmp_path: Path) -> None:
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
        paused_at = _schedules(database_url, "pause", "every-second")
        wait_for(lambda: _settled(database_url), timeout=30, what="every tick's run to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait()
    before = _ticks(database_url)
    # Paused across a restart: the new worker declares the schedule again and fires nothing.
    third = worker(database_url, "sched-1", env)
    try:
        time.sleep(3.0)  # three ticks would have fired by now
        assert _ticks(database_url) == before
        resumed_at = time.time()
        _schedules(database_url, "resume", "every-second")
        wait_for(lambda: len(_ticks(database_url)) >= len(before) + 2, timeout=60,
                 what="ticks after the resume")
        _schedules(database_url, "pause", "every-second")
        wait_for(lambda: _settled(database_url), timeout=30, what="every tick's run to finish")
    finally:
        third.send_signal(signal.SIGTERM)
        third.wait()
    ticks = _ticks(database_url)
    after = [t for t in ticks if t.timestamp() > resumed_at]
    # One run per tick, every second from the first tick to the pause: none lost while the
    # process was dead, none twice; none while paused, and the pause's ticks are not fired
    # at the resume: the next run is the first tick after it, and then every second.
    assert ticks == before + after
    assert _every_second(before) and len(before) >= 5
    assert before[-1].timestamp() <= paused_at
    assert _every_second(after) and after[0].timestamp() <= resumed_at + 3
    # Each run's step ran once (a run in flight at the kill may have run it twice).
    assert len(ticks) <= len(lines(log)) <= len(ticks) + 1


def stamp(state: dict[str, object]) -> dict[str, object]:
    return {"at": time.time()}  # as the script's step of the same name


def test_delayed_start_survives_a_crash(database_url: str) -> None:
    proc = spawn(SCRIPTS / "start_procs.py", "delay", database_url)
    out = ready(proc, "started")
    proc.kill()  # well within the delay: the process that started the run never runs it
    proc.wait()
    started = float(next(ln for ln in out if ln.startswith("started")).split()[1])
    wait_for_idle_database(database_url)
    assert sql(database_url, "SELECT status FROM dbos.workflow_status "
                             "WHERE workflow_uuid = 'late-1'") == [("DELAYED",)]
    # A new process of the app runs it once the delay is up.
    app = App("delay-app", database_url)
    app.pipeline("p", fn(stamp, name="stamp"))
    with app:
        result = app.get_run("late-1").result(timeout=30)
    assert result.state["at"] >= started + 2
    assert sql(database_url, "SELECT attributes->>'durapipe.tenant' FROM dbos.workflow_status "
                             "WHERE workflow_uuid = 'late-1'") == [("acme",)]


@pytest.mark.slow
def test_concurrent_starts_in_two_processes_give_one_run(database_url: str, tmp_path: Path) -> None:
    go, release = tmp_path / "go", tmp_path / "release"
    procs = [spawn(SCRIPTS / "start_procs.py", "dedup", database_url, str(go), str(release),
                   f"proc-{i}") for i in range(2)]
    try:
        outs = [ready(proc) for proc in procs]
        go.touch()  # 20 threads in each process start with one dedup key at once

        def ids() -> list[list[str]]:
            return [ln.split()[1:] for out in outs for ln in list(out) if ln.startswith("ids ")]

        wait_for(lambda: len(ids()) == 2, timeout=60, what="both processes' starts")
        got = ids()
        assert got[0] == got[1] and len(got[0]) == 1, outs
        assert sql(database_url, "SELECT count(*) FROM dbos.workflow_status WHERE name LIKE "
                                 "'durapipe.run:%'") == [(1,)]
        release.touch()
        for proc, out in zip(procs, outs, strict=True):
            assert proc.wait(timeout=60) == 0, "".join(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s",
               got[0][0]) == [("SUCCESS",)]
