"""SIGKILL at hypothesis-chosen points over runs with dispatch, parallel branches and a gate.

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
lines is the number of rows plus the size of that window.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from dbutil import lines, spawn, sql

SCRIPT = Path(__file__).parent / "scripts" / "kill_mixed.py"
RUNS = 4
LABELS = ["a", "b1", "b2", "c", "d1", "d2", "e"]
TOTAL = RUNS * len(LABELS)


def step_rows(url: str) -> list[str]:
    """``run:label`` of every recorded fn step, child workflows and background tasks included."""
    rows = sql(url, "SELECT workflow_uuid, function_name FROM dbos.operation_outputs "
                    "WHERE function_name LIKE '0%:%'")
    out = [f"{wf.split('/')[0]}:{name.split(':')[1]}" for wf, name in rows]
    return [s for s in out if s.split(':')[1] in LABELS]  # not the gate's own step


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=st.integers(min_value=1, max_value=TOTAL - 1))
def test_sigkill_in_a_mixed_pipeline_then_recover_runs_each_step_once(
        pg_server_url: str, tmp_path: Path, kill_at: int) -> None:
    name = f"durapipe_killmix_{uuid.uuid4().hex[:10]}"
    admin = make_url(pg_server_url).set(database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_server_url).set(database=name).render_as_string(False)
    log = tmp_path / f"effects-{name}.log"
    try:
        first = spawn(SCRIPT, url, str(log), str(RUNS), str(kill_at))
        out, _ = first.communicate(timeout=120)
        assert first.returncode == -9, out
        assert len(lines(log)) == kill_at
        recorded = Counter(step_rows(url))
        window = set(lines(log)) - set(recorded)
        assert all(n == 1 for n in Counter(lines(log)).values())

        again = spawn(SCRIPT, url, str(log), str(RUNS), "0")
        out, _ = again.communicate(timeout=180)
        assert again.returncode == 0 and "ALL DONE" in out, out

        rows = Counter(step_rows(url))
        effects = Counter(lines(log))
        expected = {f"m{i}:{label}" for i in range(RUNS) for label in LABELS}
        assert set(rows) == expected and set(rows.values()) == {1}   # one row per step
        for s in expected:
            assert effects[s] == (2 if s in window else 1), (s, effects[s], s in window)
            if s in recorded:
                assert effects[s] == 1, f"{s} was recorded before the kill yet ran again"
        assert sum(effects.values()) == sum(rows.values()) + len(window)
        assert sql(url, "SELECT count(*) FROM dbos.workflow_status WHERE status <> 'SUCCESS'") == [(0,)]
        gates = sql(url, "SELECT count(*) FROM dbos.workflow_events WHERE key = 'gate:ok' "
                         "AND value::jsonb->>'status' = 'approved'")
        assert gates == [(RUNS,)]
    finally:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
