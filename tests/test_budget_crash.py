"""A token budget counted exactly across a SIGKILL: the model calls recorded before the
kill are neither made again nor counted twice, and the run stops at the same item as
without a crash."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from dbutil import lines, most_at_once, spawn, sql, wait_for_idle_database
from durapipe.audit import install_views

SCRIPT = Path(__file__).parent / "scripts" / "budget_crash.py"
BUDGET = 25


@pytest.mark.slow
def test_budget_is_exact_after_a_crash(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "calls"
    first = spawn(SCRIPT, database_url, str(log), "3", str(BUDGET))
    out, _ = first.communicate(timeout=120)
    assert first.returncode == -9, out
    wait_for_idle_database(database_url)
    assert lines(log) == ["a", "b", "c"]  # killed inside the call for item c
    again = spawn(SCRIPT, database_url, str(log), "0", str(BUDGET))
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "BUDGET used=" in out, out
    install_views(database_url)
    tokens = sql(database_url, "SELECT input_tokens + output_tokens FROM durapipe.llm_calls "
                               "WHERE run_id = 'budget-1' ORDER BY started")
    per_call = tokens[0][0]
    assert {t for (t,) in tokens} == {per_call}
    calls = math.ceil(BUDGET / per_call)  # calls made before the usage reached the budget
    assert len(tokens) == calls
    items = "abcdef"
    # a and b were recorded before the kill: answered once. c was in flight: once more.
    assert lines(log) == ["a", "b", "c", "c", *items[3:calls]]
    assert f"used={calls * per_call} max={BUDGET}" in out
    assert f"agent 0.0#{calls}:w" in out  # the item after the last one within the budget
    assert sql(database_url, "SELECT status FROM dbos.workflow_status "
                             "WHERE workflow_uuid = 'budget-1'") == [("ERROR",)]


@pytest.mark.slow
def test_budget_is_exact_at_default_concurrency_after_a_crash(database_url: str,
                                                               tmp_path: Path) -> None:
    """Six items at once, budget 22 at 7 tokens a call: the calls go one at a time, so the
    kill inside the third call leaves two recorded; the recovery pays neither again and
    stops after the fourth recorded call, as a run without a crash does."""
    budget, per_call = 22, 7
    log = tmp_path / "calls"
    first = spawn(SCRIPT, database_url, str(log), "3", str(budget), "default")
    out, _ = first.communicate(timeout=120)
    assert first.returncode == -9, out
    wait_for_idle_database(database_url)
    before = lines(log)
    assert len(before) == 3 and len(set(before)) == 3
    again = spawn(SCRIPT, database_url, str(log), "0", str(budget), "default")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "BUDGET used=" in out, out
    calls = math.ceil(budget / per_call)  # 4: each saw usage < 22 before it started
    after = lines(log)[3:]
    recorded = before[:2] + after  # the third call before the kill was never recorded
    assert len(recorded) == len(set(recorded)) == calls, lines(log)  # none paid twice
    install_views(database_url)
    tokens = sql(database_url, "SELECT input_tokens + output_tokens FROM durapipe.llm_calls "
                               "WHERE run_id = 'budget-1'")
    assert sorted(t for (t,) in tokens) == [per_call] * calls
    assert f"used={calls * per_call} max={budget}" in out
    named = re.search(r"agent 0\.0#(\d):w", out)
    assert named and "abcdef"[int(named[1])] not in recorded, out
    assert sql(database_url, "SELECT status FROM dbos.workflow_status "
                             "WHERE workflow_uuid = 'budget-1'") == [("ERROR",)]


@pytest.mark.slow
def test_budget_is_exact_across_two_worker_processes(database_url: str, tmp_path: Path) -> None:
    """Six agent tasks of one run on a queue served by two workers (one task at a time
    each, and the first two meet before their calls): the workers' calls take the run's
    advisory lock in turn, so exactly ceil(22 / 7) = 4 calls are made, never two at once."""
    log = tmp_path / "log"
    script = SCRIPT.parent / "budget_procs.py"
    workers = [spawn(script, database_url, str(log), f"w{i}", "worker") for i in (1, 2)]
    try:
        runner = spawn(script, database_url, str(log), "starter", "run")
        out, _ = runner.communicate(timeout=120)
    finally:
        (tmp_path / "log.stop").touch()
        for w in workers:
            w.communicate(timeout=60)
    assert runner.returncode == 0 and "BUDGET used=28 max=22" in out, out
    rows = [ln.split() for ln in lines(log)]
    assert len({r[1] for r in rows if r[0] == "start"}) == 2  # tasks ran in both workers
    calls = [r for r in rows if r[0] == "call"]
    assert len(calls) == math.ceil(22 / 7) == 4, rows
    assert most_at_once([(float(r[3]), float(r[4])) for r in calls]) == 1
    assert re.search(r"agent 0\.0\.\d\.1:w", out), out  # a task's agent, past the budget
