"""SIGKILL at fixed and hypothesis-chosen points over runs with dispatch, parallel branches and a gate.

Pipeline (``tests/scripts/kill_mixed.py``):
``a >> dispatch(b1 >> b2, names=["bg"]) >> (c | (d1 >> d2)) >> gate("ok") >> join() >> e``,
several runs at once, an approver thread answering the gates, the process killing itself
right after its ``kill_at``-th side effect.

Exactly-once rule: a step appends ``run:label`` to the log after its work, and DBOS records
its output row after the body returns. So the steps in flight at the kill whose log line is
written but whose row is not (the kill window: the step that triggered the kill, plus any
concurrent step of another run, branch or background task that logged without being
recorded) legitimately run again on recovery; every step whose row was recorded before the
kill never runs again. After recovery every run succeeded, each step of each run (in the
run's workflow, its parallel child workflow or its background task) has exactly one row,
its log count is 2 when it was in the kill window and 1 otherwise, and the total of log
lines is the number of rows plus the size of that window. The window is bounded: each step
in it had every step before it in its run recorded, and a run has at most three in it (the
background task and the two branches).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbutil import kill_then_recover, scratch_database, sql

SCRIPT = Path(__file__).parent / "scripts" / "kill_mixed.py"
RUNS = 4
# a >> dispatch(b1 >> b2) >> (c | (d1 >> d2)) >> gate >> join() >> e: what each step waits for.
AFTER = {"a": set(), "b1": {"a"}, "b2": {"b1"}, "c": {"a"}, "d1": {"a"}, "d2": {"d1"},
         "e": {"b2", "c", "d2"}}
TOTAL = RUNS * len(AFTER)


def approved_gates(url: str) -> list[tuple[int]]:
    return sql(url, "SELECT count(*) FROM dbos.workflow_events WHERE key = 'gate:ok' "
                    "AND value::jsonb->>'status' = 'approved'")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["m0:a", "m1:b1", "m2:d1", "m3:e"])
def test_sigkill_at_fixed_points_in_a_mixed_pipeline_then_recover_runs_each_step_once(
        database_url: str, tmp_path: Path, kill_at: str) -> None:
    """The first step, a background task's step, a branch step, the last step."""
    kill_then_recover(SCRIPT, database_url, tmp_path / "effects.log", RUNS, kill_at, "m", AFTER, 3)
    assert approved_gates(database_url) == [(RUNS,)]


@pytest.mark.slow
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=st.integers(min_value=1, max_value=TOTAL - 1))
def test_sigkill_in_a_mixed_pipeline_then_recover_runs_each_step_once(
        pg_server_url: str, tmp_path: Path, kill_at: int) -> None:
    with scratch_database(pg_server_url, "durapipe_kill") as url:
        log = tmp_path / f"effects-{uuid.uuid4().hex}.log"
        kill_then_recover(SCRIPT, url, log, RUNS, kill_at, "m", AFTER, 3)
        assert approved_gates(url) == [(RUNS,)]
