"""Durable retries and best_of across SIGKILL (script: ``scripts/flow_control_crash.py``).

- A retry counted across a kill between attempts: the attempt that failed before the kill
  is not run again, the next attempt runs under its own number, and the run finishes.
- best_of killed with two candidates done and one in flight, then killed again after the
  winner was chosen: the finished candidates never run again, and the last process keeps
  the winner recorded before the kill (the score function is random on purpose).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dbutil import lines, spawn, sql, wait_for, wait_for_idle_database

SCRIPT = Path(__file__).parent / "scripts" / "flow_control_crash.py"

pytestmark = pytest.mark.slow


def _kill(proc: subprocess.Popen[str], url: str) -> None:
    proc.kill()
    proc.wait(timeout=30)
    wait_for_idle_database(url)


def _finish(url: str, folder: Path, case: str) -> dict[str, Any]:
    proc = spawn(SCRIPT, url, str(folder), case, "finish")
    out, _ = proc.communicate(timeout=120)
    found = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert found, out
    state: dict[str, Any] = json.loads(found[0][len("RESULT "):])
    return state


def _safe(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """``sql``, or nothing while the starting process has not created DBOS's tables yet."""
    try:
        return sql(url, query, *params)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        return []


def _rows(url: str, wf: str) -> list[tuple[Any, ...]]:
    return _safe(url, "SELECT function_name, output, error IS NOT NULL, completed_at_epoch_ms "
                    "FROM dbos.operation_outputs WHERE workflow_uuid = %s ORDER BY function_id", wf)


def test_retry_attempt_count_survives_a_kill_between_attempts(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "effects.log"
    proc = spawn(SCRIPT, database_url, str(tmp_path), "retry", "start")
    # Attempt 1 failed and its decision is recorded: the process is in the backoff (1 s).
    wait_for(lambda: any(r[0] == "0.0:retry" for r in _rows(database_url, "fc-retry")),
             timeout=60, what="attempt 1 to fail")
    _kill(proc, database_url)
    before = _rows(database_url, "fc-retry")
    assert [r[0] for r in before] == ["0.0:flaky", "0.0:retry"]
    assert lines(log) == ["flaky"]

    state = _finish(database_url, tmp_path, "retry")
    assert state["flaky_calls"] == 3 and state["done"] is True
    after = _rows(database_url, "fc-retry")
    assert [r[0] for r in after] == ["0.0:flaky", "0.0:retry", "0.0#1:flaky", "0.0#1:retry",
                                     "0.0#2:flaky", "0.1:done"]
    assert after[:2] == before  # attempt 1 and its decision were not made again
    assert [r[2] for r in after] == [True, False, True, False, False, False]
    assert json.loads(after[3][1])["attempt"] == 2
    assert lines(log) == ["flaky", "flaky", "flaky", "done"]


def test_best_of_replayed_after_crashes_keeps_its_winner(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "effects.log"

    def children() -> dict[str, str]:
        return dict(_safe(database_url, "SELECT workflow_uuid, status FROM dbos.workflow_status "
                                      "WHERE workflow_uuid LIKE 'fc-best/%'"))

    proc = spawn(SCRIPT, database_url, str(tmp_path), "best", "start")
    # Candidates 0 and 1 finished (recorded), candidate 2 waits: kill.
    wait_for(lambda: [v for k, v in children().items() if v == "SUCCESS"].__len__() == 2,
             timeout=60, what="two candidates to finish")
    _kill(proc, database_url)
    assert sorted(lines(log)) == ["cand0", "cand1"]

    (tmp_path / "go-cand").touch()
    proc = spawn(SCRIPT, database_url, str(tmp_path), "best", "start-recovered")
    chosen = "0.0:best_of(cand)"
    wait_for(lambda: any(r[0] == chosen for r in _rows(database_url, "fc-best")),
             timeout=60, what="the winner to be chosen")
    _kill(proc, database_url)
    record = json.loads(next(r[1] for r in _rows(database_url, "fc-best") if r[0] == chosen))
    winner = record["winner"]

    (tmp_path / "go-after").touch()
    state = _finish(database_url, tmp_path, "best")
    assert state["who"] == winner
    assert state["value"] == record["candidates"][winner]["writes"]["value"]
    assert sorted(lines(log)) == ["after", "cand0", "cand1", "cand2"]
    assert [r[0] for r in _rows(database_url, "fc-best")].count(chosen) == 1
