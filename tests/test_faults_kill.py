"""SIGKILL at fixed and hypothesis-chosen points over many runs of a pipeline with parallel
branches.

Exactly-once rule: a step appends ``run:label`` to the log after its work, and DBOS records
its output row after the body returns. So when the process dies, a step whose log line is
written but whose row is not (the kill window) legitimately runs again on recovery; every
step whose row was recorded before the kill never runs again. After recovery each step of
each run has exactly one row, its log count is 1, or 2 when it was in the kill window, and
the total of log lines is the number of rows plus the size of that window. The window is
bounded: each step in it had every step before it in its run recorded, and a run has at
most three in it (its three branches).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbutil import kill_then_recover, scratch_database

SCRIPT = Path(__file__).parent / "scripts" / "kill_pipeline.py"
RUNS = 6
# a >> ((b1 >> b2) | c | (d1 >> d2)) >> e: what each step waits for.
AFTER = {"a": set(), "b1": {"a"}, "b2": {"b1"}, "c": {"a"}, "d1": {"a"}, "d2": {"d1"},
         "e": {"b2", "c", "d2"}}
TOTAL = RUNS * len(AFTER)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["k0:a", "k2:c", "k4:d2", TOTAL // 2, "k5:e"])
def test_sigkill_at_fixed_points_then_recover_runs_each_step_once(
        database_url: str, tmp_path: Path, kill_at: int | str) -> None:
    """The first step, a branch step, the last step of a branch, the middle, the last."""
    kill_then_recover(SCRIPT, database_url, tmp_path / "effects.log", RUNS, kill_at, "k", AFTER, 3)


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=st.integers(min_value=1, max_value=TOTAL - 1))
def test_sigkill_anywhere_then_recover_runs_each_step_once(pg_server_url: str, tmp_path: Path,
                                                            kill_at: int) -> None:
    with scratch_database(pg_server_url, "durapipe_kill") as url:
        log = tmp_path / f"effects-{uuid.uuid4().hex}.log"
        kill_then_recover(SCRIPT, url, log, RUNS, kill_at, "k", AFTER, 3)
