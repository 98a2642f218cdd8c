"""A token budget counted exactly across a SIGKILL: the model calls recorded before the
kill are neither made again nor counted twice, and the run stops at the same item as
without a crash."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from dbutil import lines, spawn, sql, wait_for_idle_database
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
