"""Scale-out: worker processes with their own executor ids, a dead worker's run finished by
a live one (`durapipe recover` / `app.recover`), and runs on a queue with limits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dbutil import lines, sql, wait_for
from durapipe.cli import cli
from durapipe.errors import AppStateError
from ops import workers_app

TESTS = Path(__file__).parent
APP_MODULE = "ops.workers_app"  # by module name, so function identities match this process


def durapipe(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "durapipe.cli", *args],
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}),
                                     PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def events(log: Path, job: str) -> list[str]:
    return [ln.split()[0] for ln in lines(log) if ln.split()[0].endswith(f":{job}")]


def start_and_kill(database_url: str, tmp_path: Path, job: str) -> Path:
    """Start a run in a process with executor id dead-1; SIGKILL it inside step two."""
    log, marker = tmp_path / "log", tmp_path / "marker"
    proc = durapipe("run", f"{APP_MODULE}:steps", "--input", f"job={job}", "--input", f"log={log}",
                    "--run-id", job, "--executor-id", "dead-1", "--json", "--database-url", database_url,
                    env={"OPS_BLOCK_MARKER": str(marker)})
    try:
        wait_for(marker.exists, what="the run to reach its kill point")
    finally:
        proc.kill()
        proc.wait()
    assert events(log, job) == [f"one:{job}", f"two-start:{job}"]
    assert sql(database_url, "SELECT status, executor_id FROM dbos.workflow_status "
                             "WHERE workflow_uuid = %s", job) == [("PENDING", "dead-1")]
    return log


@pytest.mark.slow
def test_live_worker_finishes_a_dead_workers_run(database_url: str, tmp_path: Path) -> None:
    log = start_and_kill(database_url, tmp_path, "job-1")
    worker = durapipe("worker", APP_MODULE, "--executor-id", "live-2", "--database-url", database_url)
    try:
        assert worker.stdout is not None
        assert "worker live-2 ready" in worker.stdout.readline()
        res = CliRunner().invoke(cli, ["recover", "dead-1", "--database-url", database_url])
        assert res.exit_code == 0 and "re-queued 1 workflow(s) of dead-1: job-1" in res.output
        wait_for(lambda: sql(database_url, "SELECT status FROM dbos.workflow_status "
                                           "WHERE workflow_uuid = 'job-1'") == [("SUCCESS",)],
                 what="the live worker to finish job-1")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    # step one finished before the kill and is not run again; step two was interrupted
    assert events(log, "job-1") == ["one:job-1", "two-start:job-1", "two-start:job-1",
                                    "two-done:job-1", "three:job-1"]
    assert sql(database_url, "SELECT executor_id FROM dbos.workflow_status WHERE workflow_uuid = 'job-1'") \
        == [("live-2",)]
    # recovering again is a no-op: the run is no longer the dead executor's
    res = CliRunner().invoke(cli, ["recover", "dead-1", "--database-url", database_url])
    assert "re-queued 0 workflow(s)" in res.output


@pytest.mark.slow
def test_app_recover_hands_over_to_this_process(database_url: str, tmp_path: Path) -> None:
    log = start_and_kill(database_url, tmp_path, "job-2")
    app = workers_app.app
    app.database_url, app.executor_id = database_url, "live-3"
    try:
        with app:
            assert app.recover(["dead-1"]) == ["job-2"]
            assert app.get_run("job-2").result(timeout=30).state["three"] is True
    finally:
        app.shutdown()
        app.executor_id = None
    assert events(log, "job-2") == ["one:job-2", "two-start:job-2", "two-start:job-2",
                                    "two-done:job-2", "three:job-2"]


def test_queue_runs_one_at_a_time_per_worker(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    app = workers_app.app
    app.database_url = database_url
    try:
        with app:
            handles = [workers_app.steps.enqueue({"job": f"q{i}", "log": str(log)}, queue="jobs")
                       for i in range(3)]
            for h in handles:
                assert h.result(timeout=60).state["three"] is True
            assert sql(database_url, "SELECT DISTINCT queue_name FROM dbos.workflow_status") == [("jobs",)]
            with pytest.raises(AppStateError, match="has no queue 'other'"):
                workers_app.steps.enqueue({"job": "x", "log": str(log)}, queue="other")
    finally:
        app.shutdown()
    # worker_concurrency=1: each run's steps end before the next run's first step starts
    spans: dict[str, tuple[float, float]] = {}
    for ln in lines(log):
        name, _, ts = ln.split()
        job = name.split(":")[1]
        start, end = spans.get(job, (float(ts), float(ts)))
        spans[job] = (min(start, float(ts)), max(end, float(ts)))
    ordered = sorted(spans.values())
    assert len(ordered) == 3
    assert all(a[1] < b[0] for a, b in zip(ordered, ordered[1:], strict=False))
