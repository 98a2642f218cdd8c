"""SIGKILL at hypothesis-chosen points over many runs of a pipeline with parallel branches.

Exactly-once rule: a step appends ``run:label`` to the log after its work, and DBOS records
its output row after the body returns. So when the process dies, a step whose log line is
written but whose row is not (the kill window) legitimately runs again on recovery; every
step whose row was recorded before the kill never runs again. After recovery each step of
each run has exactly one row, its log count is 1, or 2 when it was in the kill window, and
the total of log lines is the number of rows plus the size of that window.
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
LABELS = ["a", "b1", "b2", "c", "d1", "d2", "e"]
TOTAL = RUNS * len(LABELS)


@pytest.mark.slow
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=st.integers(min_value=1, max_value=TOTAL - 1))
def test_sigkill_anywhere_then_recover_runs_each_step_once(pg_server_url: str, tmp_path: Path,
                                                            kill_at: int) -> None:
    with scratch_database(pg_server_url, "durapipe_kill") as url:
        log = tmp_path / f"effects-{uuid.uuid4().hex}.log"
        kill_then_recover(SCRIPT, url, log, RUNS, kill_at, "k", LABELS)
