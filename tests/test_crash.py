"""Crash recovery: SIGKILL a process mid-run, start it again, nothing finished runs twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbutil import lines, spawn, sql, wait_for

SCRIPT = Path(__file__).parent / "scripts" / "crash_pipeline.py"


def crash_at_step_four(database_url: str, log: Path) -> None:
    proc = spawn(SCRIPT, database_url, str(log), "crash")
    try:
        wait_for(lambda: "blocked-at-4" in lines(log), timeout=60, what="step 4 to start")
    finally:
        proc.kill()
        proc.wait()
    assert lines(log) == ["step1", "step2", "step3", "blocked-at-4"]


@pytest.mark.slow
def test_sigkill_after_step_three_resumes_without_repeating(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "effects.log"
    crash_at_step_four(database_url, log)
    status = sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid='crash-run'")
    assert status == [("PENDING",)]
    # The killed run is the DBOS workflow of its pipeline, keyed in the start's transaction.
    assert sql(database_url, "SELECT s.name, k.run_id, k.pipeline FROM dbos.workflow_status s "
               "JOIN durapipe.run_keys k ON k.workflow_id = s.workflow_uuid "
               "WHERE s.workflow_uuid = 'crash-run'") == [("durapipe.run:five", "crash-run", "five")]

    again = spawn(SCRIPT, database_url, str(log), "recover")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert "RESULT" in out
    assert [x for x in lines(log) if x.startswith("step")] == [f"step{i}" for i in range(1, 6)]
    rows = sql(database_url, "SELECT function_name FROM dbos.operation_outputs "
                             "WHERE workflow_uuid='crash-run' ORDER BY function_id")
    assert [r[0] for r in rows] == [f"0.{i}:step{i + 1}" for i in range(5)]
    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid='crash-run'") == [("SUCCESS",)]


@pytest.mark.slow
def test_node_added_after_the_frontier_continues_on_new_code(database_url: str, tmp_path: Path) -> None:
    """A deploy that only appends a node: the run resumes where it stopped, on the new code."""
    log = tmp_path / "effects.log"
    crash_at_step_four(database_url, log)
    again = spawn(SCRIPT, database_url, str(log), "changed")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert "RESULT" in out and "('s6', 6)" in out
    # Steps 1-3 were recorded before the kill and are not run again; 4-6 run on the new code.
    assert [x for x in lines(log) if x.startswith("step")] == [f"step{i}" for i in range(1, 7)]
    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid='crash-run'") \
        == [("SUCCESS",)]
