"""Crash tests: a process is SIGKILLed mid-run and a new one recovers the run.

Deadlines are checked against wall-clock timestamps the steps recorded, never against
how long the test took.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dbutil import lines, spawn, sql, wait_for

SCRIPT = Path(__file__).with_name("crash_control.py")
pytestmark = pytest.mark.slow


def stamps(log: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in lines(log):
        what, _, t = line.rpartition(" ")
        out.setdefault(what, []).append(float(t))
    return out


def kill_once_stamped(url: str, mode: str, log: Path, stamp: str, what: str | None = None,
                      delay: float = 0.0) -> None:
    """Run the script's first life in ``mode`` and SIGKILL it once it logged ``stamp``
    (``delay`` seconds later)."""
    first = spawn(SCRIPT, url, mode, str(log), "first")
    try:
        wait_for(lambda: stamp in stamps(log), timeout=60, what=what or stamp)
        if delay:
            time.sleep(delay)
    finally:
        first.kill()
        first.wait()


def crash_and_recover(url: str, mode: str, log: Path, kill_after: str, delay: float = 0.0) -> None:
    kill_once_stamped(url, mode, log, kill_after, delay=delay)
    second = spawn(SCRIPT, url, mode, str(log), "second")
    out, _ = second.communicate(timeout=90)
    assert second.returncode == 0, out


def test_gate_survives_a_kill_and_continues_on_approval(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    crash_and_recover(database_url, "gate", log, "waiting")
    seen = stamps(log)
    assert len(seen["draft"]) == 1 and len(seen["publish"]) == 1
    assert seen["publish"][0] > seen["process-second"][0]
    assert any(k.startswith("result ") and "legal" in k and "publish" in k for k in seen)


def test_a_gate_answered_from_the_cli_while_its_worker_is_dead(database_url: str, tmp_path: Path) -> None:
    """SIGKILL while the run waits at its gate; `durapipe approve` answers from the database
    alone while no process runs the run; the restarted worker resumes it from the answer,
    and nothing recorded before the kill runs again."""
    from typer.testing import CliRunner

    from durapipe.cli import cli

    log = tmp_path / "log"
    kill_once_stamped(database_url, "gate", log, "waiting", "the gate")
    res = CliRunner().invoke(cli, ["approve", "crash-1", "legal", "--by", "alice", "--database-url", database_url])
    assert res.exit_code == 0 and "approved gate 'legal' of run crash-1 by alice" in res.output, res.output
    second = spawn(SCRIPT, database_url, "gate", str(log), "resume")
    out, _ = second.communicate(timeout=90)
    assert second.returncode == 0, out
    seen = stamps(log)
    assert len(seen["draft"]) == 1 and len(seen["publish"]) == 1
    assert seen["publish"][0] > seen["process-resume"][0]
    assert any(k.startswith("result ") and "legal" in k and "publish" in k for k in seen)


def test_an_answered_gate_survives_a_kill_before_the_run_recorded_the_decision(
    database_url: str, tmp_path: Path
) -> None:
    """The run's own record of the decision is held back an hour (``DEFER_SECONDS``), so the
    kill lands between approve's record and the run's every time."""
    log = tmp_path / "log"
    kill_once_stamped(database_url, "gate-answered", log, "held-start", "the node after the gate")
    [(answered,)] = sql(database_url, GATE_EVENT.format("", ""))
    history = sql(database_url, GATE_EVENT.format("_history", " ORDER BY function_id"))
    # approve recorded the decision; the run itself had not yet when it was killed
    assert json.loads(answered)["status"] == "approved"
    assert [json.loads(v)["status"] for (v,) in history] == ["waiting"]
    _decision_kept_across_the_restart(database_url, log, "gate-answered", json.loads(answered))


def test_an_answered_gate_survives_a_kill_in_the_real_defer_window(database_url: str, tmp_path: Path) -> None:
    """The same without widening the window: the node after the gate kills the process as
    it starts, within the 20 ms before the run records the decision itself (or just after,
    on a slow machine: the outcome must be the same either way)."""
    log = tmp_path / "log"
    first = spawn(SCRIPT, database_url, "gate-answered-now", str(log), "first")
    first.communicate(timeout=90)
    assert first.returncode == -9 and len(stamps(log)["held-start"]) == 1
    _decision_kept_across_the_restart(database_url, log, "gate-answered-now", None)


GATE_EVENT = ("SELECT value FROM dbos.workflow_events{} WHERE workflow_uuid = 'crash-1' "
              "AND key = 'gate:legal'{}")


def _decision_kept_across_the_restart(database_url: str, log: Path, mode: str,
                                      answered: dict[str, object] | None) -> None:
    second = spawn(SCRIPT, database_url, mode, str(log), "second")
    out, _ = second.communicate(timeout=90)
    assert second.returncode == 0, out
    seen = stamps(log)
    assert len(seen["draft"]) == 1 and len(seen["held"]) == 1 and len(seen["held-start"]) == 2
    assert any(k.startswith("result ") and "legal" in k and "held" in k for k in seen)
    final = sql(database_url, GATE_EVENT.format("", ""))
    history = sql(database_url, GATE_EVENT.format("_history", " ORDER BY function_id"))
    decided = json.loads(final[0][0])
    assert decided["status"] == "approved" and decided["by"] == "alice" and decided["comment"] == "go"
    if answered is not None:
        assert decided == answered
    # waiting, then the one decision: recorded once, whether or not before the kill
    assert [json.loads(v)["status"] for (v,) in history] == ["waiting", "approved"]
    assert [json.loads(v) for (v,) in history][1:] == [decided]


def _deadline_kept_across_a_restart(database_url: str, log: Path, pipeline: str, kill_at: str) -> None:
    crash_and_recover(database_url, pipeline, log, kill_at, delay=1.0)
    seen = stamps(log)
    t0, t1, restart = seen["t0"][0], seen["t1"][0], seen["process-second"][0]
    assert len(seen["t0"]) == 1 and len(seen["t1"]) == 1
    assert t1 >= t0 + 4          # the deadline was honoured ...
    assert t1 < restart + 4      # ... and not started over by the restart


def test_sleep_keeps_its_deadline_across_a_restart(database_url: str, tmp_path: Path) -> None:
    _deadline_kept_across_a_restart(database_url, tmp_path / "log", "sleep", "t0")


def test_timeout_keeps_its_deadline_across_a_restart(database_url: str, tmp_path: Path) -> None:
    _deadline_kept_across_a_restart(database_url, tmp_path / "log", "timeout", "slow-start")
    status = sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid LIKE %s",
                 "crash-1/0.1.0%")
    assert status == [("CANCELLED",)]


def test_race_losers_stay_cancelled_after_a_restart(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    crash_and_recover(database_url, "race", log, "a-start")
    third = spawn(SCRIPT, database_url, "race", str(log), "third")
    out, _ = third.communicate(timeout=60)
    assert third.returncode == 0, out
    seen = stamps(log)
    assert "exit-third" in seen and "b_done" not in seen
    assert any(k.startswith("result ") and "winner" in k for k in seen)
    rows = dict(sql(database_url, "SELECT workflow_uuid, status FROM dbos.workflow_status "
                                  "WHERE workflow_uuid LIKE 'crash-1%%'"))
    assert rows["crash-1"] == "SUCCESS"
    assert rows["crash-1/0.0:fast_on_restart"] == "SUCCESS"
    assert rows["crash-1/0.1:seq"] == "CANCELLED"
