"""dispatch across a SIGKILL, and background work executed by another worker process."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dbutil import lines, spawn, sql, wait_for

SCRIPT = Path(__file__).with_name("dispatch_procs.py")
pytestmark = pytest.mark.slow


def final_state(proc_output: str) -> dict[str, object]:
    line = next(x for x in proc_output.splitlines() if x.startswith("STATE "))
    return dict(json.loads(line.removeprefix("STATE ")))


def test_crash_with_tasks_and_main_pipeline_in_flight(database_url: str, tmp_path: Path) -> None:
    first = spawn(SCRIPT, "crash", database_url, str(tmp_path), "1")
    try:
        wait_for(lambda: all((tmp_path / f"marker-{m}").exists() for m in ("a", "b", "main")),
                 timeout=60, what="both background tasks and the main step in flight")
    finally:
        first.kill()
        first.wait()
    assert lines(tmp_path / "log") == ["writer"]
    second = spawn(SCRIPT, "crash", database_url, str(tmp_path), "2")
    out, _ = second.communicate(timeout=90)
    assert second.returncode == 0, out
    assert final_state(out)["final"] == ["d-a", "d-b", 1]
    counts = Counter(lines(tmp_path / "log"))
    assert counts == {"writer": 1, "bg_a done": 1, "bg_b done": 1, "main done": 1,
                      "cb bg_a": 1, "cb bg_b": 1, "final": 1}
    # One child workflow per task, never started twice.
    children = sql(database_url, "SELECT workflow_uuid, status FROM dbos.workflow_status "
                                 "WHERE parent_workflow_id = 'crash-1' ORDER BY 1")
    assert children == [("crash-1/0.1.0:bg_a", "SUCCESS"), ("crash-1/0.1.1:bg_b", "SUCCESS")]


def test_a_callback_done_before_the_kill_does_not_run_again(database_url: str, tmp_path: Path) -> None:
    """Task bg_a finishes and its callback runs and is recorded; bg_b and the main step are
    still blocked when the process is killed. After recovery bg_a's callback is not run
    again, bg_b's runs once."""
    first = spawn(SCRIPT, "crash", database_url, str(tmp_path), "1", "b,main")
    callback = ("SELECT count(*) FROM dbos.operation_outputs WHERE workflow_uuid = 'crash-1/0.1.0:bg_a' "
                "AND function_name LIKE '%:on_complete' AND output IS NOT NULL")
    try:
        wait_for(lambda: all((tmp_path / f"marker-{m}").exists() for m in ("b", "main"))
                 and sql(database_url, callback) == [(1,)],
                 timeout=60, what="bg_a's callback recorded, bg_b and the main step in flight")
    finally:
        first.kill()
        first.wait()
    assert lines(tmp_path / "log") == ["writer", "bg_a done", "cb bg_a"]
    assert sql(database_url, "SELECT status FROM dbos.workflow_status "
                             "WHERE workflow_uuid = 'crash-1/0.1.0:bg_a'") == [("SUCCESS",)]
    second = spawn(SCRIPT, "crash", database_url, str(tmp_path), "2")
    out, _ = second.communicate(timeout=90)
    assert second.returncode == 0, out
    assert final_state(out)["final"] == ["d-a", "d-b", 1]
    assert Counter(lines(tmp_path / "log")) == {
        "writer": 1, "bg_a done": 1, "cb bg_a": 1, "bg_b done": 1, "cb bg_b": 1, "main done": 1, "final": 1}


def test_queued_work_runs_on_another_worker(database_url: str, tmp_path: Path) -> None:
    worker = spawn(SCRIPT, "worker", database_url, str(tmp_path))
    try:
        wait_for((tmp_path / "ready").exists, timeout=60, what="the worker to launch")
        web = spawn(SCRIPT, "web", database_url, str(tmp_path))
        out, _ = web.communicate(timeout=90)
        assert web.returncode == 0, out
        state = final_state(out)
        assert state["one_pid"] == state["two_pid"] == worker.pid != web.pid
        rows = sql(database_url, "SELECT workflow_uuid, executor_id, queue_name FROM "
                                 "dbos.workflow_status WHERE workflow_uuid LIKE 'queued-1%%' "
                                 "ORDER BY 1")
        assert rows == [("queued-1", "web-a", None),
                        ("queued-1/0.0.0:queued_one", "worker-b", "bg"),
                        ("queued-1/0.0.1:queued_two", "worker-b", "bg")]
    finally:
        (tmp_path / "stop").write_text("x")
        worker.wait(timeout=30)
