"""Runs named by pipeline in DBOS's own tools, and durapipe's indexed run keys: the audit
views and `durapipe runs -p/--status/--since` read them through indexes, old databases are
backfilled, forks and runs recorded under the old name keep working."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dbos import DBOS

from dbutil import sql, wait_for
from durapipe import App, fn, gate
from durapipe.audit import install_views
from durapipe.engine.admin import Admin
from durapipe.engine.runlist import RunQuery
from durapipe.web.queries import RunFilter, list_page

Counts: dict[str, int] = {}


def count(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def step(state: dict[str, Any]) -> dict[str, Any]:
        Counts[key] = Counts.get(key, 0) + 1
        return {key: state.get("n", 0) + 1}
    step.__name__ = key
    return step


def build(make_app: Callable[..., App]) -> tuple[App, Any, Any]:
    app = make_app("keys-app")
    alpha = app.pipeline("alpha", fn(count("a1")) >> (fn(count("a2")) | fn(count("a3"))))
    beta = app.pipeline("beta", fn(count("b1")))
    return app, alpha, beta


def test_runs_are_named_by_pipeline_in_dbos_and_keyed_for_sql(
        make_app: Callable[..., App], database_url: str) -> None:
    app, alpha, beta = build(make_app)
    with app:
        alpha.run({"n": 1}, run_id="a-1")
        alpha.run({"n": 2}, run_id="a-2")
        beta.run({"n": 3}, run_id="b-1")
        # DBOS's own API (and so `dbos workflow list -n`, its console) tells pipelines apart.
        named = DBOS.list_workflows(name="durapipe.run:alpha", has_parent=False)
        assert sorted(w.workflow_id for w in named) == ["a-1", "a-2"]
        assert [w.workflow_id for w in DBOS.list_workflows(name="durapipe.run:beta")] == ["b-1"]
        assert app.get_run("a-1").result(timeout=30).state["a3"] == 2
    # DBOS's own command line: `dbos workflow list -n durapipe.run:alpha`.
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "dbos"), "workflow", "list", "-s", database_url,
         "-n", "durapipe.run:alpha", "-l", "10"], capture_output=True, text=True, timeout=60, check=True)
    assert sorted(w["workflow_id"] for w in json.loads(listed.stdout)) == ["a-1", "a-2"]
    install_views(database_url)
    assert sql(database_url, "SELECT run_id, pipeline, status FROM durapipe.runs ORDER BY run_id") == [
        ("a-1", "alpha", "SUCCESS"), ("a-2", "alpha", "SUCCESS"), ("b-1", "beta", "SUCCESS")]
    assert sql(database_url, "SELECT pipeline, node_path FROM durapipe.workflows "
               "WHERE run_id = 'a-1'") == [("alpha", "0")]
    with Admin(database_url) as admin:
        assert [r.run_id for r in admin.list_runs(pipeline="alpha")] == ["a-2", "a-1"]
        assert [r.run_id for r in admin.list_runs(pipeline="beta", status="success")] == ["b-1"]
        assert admin.list_runs(pipeline="beta", status="ERROR") == []
        future = datetime.now(timezone.utc) + timedelta(hours=1)
        assert admin.list_runs(since=future) == []
        assert len(admin.list_runs(limit=2)) == 2
        forked = admin.fork("a-1", from_node="0.1")
    # A fork is the same DBOS workflow (so a worker with the pipeline runs it) and a run of
    # its own in the views.
    with app:
        app.get_run(forked).result(timeout=30)
        assert [w.workflow_id for w in DBOS.list_workflows(name="durapipe.run:alpha", forked_from="a-1")] \
            == [forked]
    assert sql(database_url, "SELECT pipeline, status FROM durapipe.runs WHERE run_id = %s", forked) == [
        ("alpha", "SUCCESS")]


def test_an_older_database_is_backfilled_and_its_runs_still_recover(
        make_app: Callable[..., App], database_url: str) -> None:
    """A database written before run keys and per-pipeline names: its runs are all the
    workflow ``durapipe.run``. The next launch keys them; a PENDING one resumes."""
    app, alpha, beta = build(make_app)
    with app:
        alpha.run({"n": 1}, run_id="old-done")
        beta.run({"n": 1}, run_id="old-pending")
    with psycopg.connect(database_url, autocommit=True) as con:
        con.execute("DROP TABLE durapipe.run_keys CASCADE")
        for trigger, table in (("durapipe_run_keys", "workflow_input"),
                               ("durapipe_run_keys_delete", "workflow_status"),
                               ("durapipe_run_keys_truncate", "workflow_status"),
                               ("durapipe_run_keys_status", "workflow_status")):
            con.execute(f"DROP TRIGGER {trigger} ON dbos.{table}")
        con.execute("UPDATE dbos.workflow_status SET name = 'durapipe.run' "
                    "WHERE name LIKE 'durapipe.run:%'")
        # The run had not finished when the old process stopped: forget its step and outcome.
        con.execute("DELETE FROM dbos.operation_outputs WHERE workflow_uuid = 'old-pending'")
        con.execute("DELETE FROM dbos.workflow_output WHERE workflow_uuid = 'old-pending'")
        con.execute("UPDATE dbos.workflow_status SET status = 'PENDING', completed_at = NULL "
                    "WHERE workflow_uuid = 'old-pending'")
    before = Counts.get("b1", 0)
    with app:  # launches: keys the old runs, recovers the pending one under its old name
        assert app.get_run("old-pending").result(timeout=30).state["b1"] == 2
    assert Counts["b1"] == before + 1
    install_views(database_url)
    assert sql(database_url, "SELECT run_id, pipeline, status FROM durapipe.runs ORDER BY run_id") == [
        ("old-done", "alpha", "SUCCESS"), ("old-pending", "beta", "SUCCESS")]
    with Admin(database_url) as admin:
        assert [r.run_id for r in admin.list_runs(pipeline="beta")] == ["old-pending"]
        assert [r.run_id for r in admin.list_runs(status="SUCCESS")] == ["old-pending", "old-done"]


def boom(state: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("boom")


def test_runs_by_status_follow_every_status_change(make_app: Callable[..., App], database_url: str) -> None:
    """`durapipe runs --status` (and the console's status filter) reads the status kept in
    the run keys: it follows a run from PENDING to CANCELLED, failed runs are ERROR, and a
    database keyed before the status was kept gets it at the next launch."""
    app = make_app("status-keys")
    alpha = app.pipeline("alpha", fn(count("s1")))
    beta = app.pipeline("beta", fn(boom, name="boom"))
    waits = app.pipeline("waits", gate("ok", "go on?") >> fn(count("s2")))

    def ids(**filters: Any) -> list[str]:
        with Admin(database_url) as admin:
            return [r.run_id for r in admin.list_runs(**filters)]

    with app:
        alpha.run({}, run_id="ok-1")
        beta.start({}, run_id="bad-1")
        handle = waits.start({}, run_id="wait-1")
        wait_for(lambda: ids(status="ERROR") == ["bad-1"], what="bad-1 listed as ERROR")
        wait_for(lambda: bool(sql(database_url, "SELECT 1 FROM dbos.workflow_events "
                                  "WHERE workflow_uuid = 'wait-1'")), what="the gate's request")
        assert ids(status="PENDING") == ["wait-1"]
        assert ids(pipeline="waits", status="pending") == ["wait-1"]
        assert ids(pipeline="alpha", status="SUCCESS") == ["ok-1"] and ids(pipeline="alpha", status="ERROR") == []
        with Admin(database_url) as admin:
            page, _ = list_page(admin, RunFilter(app.dbos_name, status="PENDING"), 10)
        assert [r.run_id for r in page] == ["wait-1"]
        handle.cancel()
        wait_for(lambda: ids(status="CANCELLED") == ["wait-1"], what="wait-1 listed as CANCELLED")
        assert ids(status="PENDING") == []
    # The keys of the previous release: no status column, no status triggers; a status
    # changes while no current App has launched.
    with psycopg.connect(database_url, autocommit=True) as con:
        con.execute("DROP TRIGGER durapipe_run_keys_status ON dbos.workflow_status")
        con.execute("ALTER TABLE durapipe.run_keys DROP COLUMN status")  # and its indexes
        con.execute("UPDATE dbos.workflow_status SET status = 'ERROR' WHERE workflow_uuid = 'ok-1'")
    with app:
        assert ids(status="ERROR") == ["bad-1", "ok-1"]  # newest first
        assert ids(status="CANCELLED") == ["wait-1"] and ids(status="SUCCESS") == []
        alpha.run({}, run_id="ok-2")
        assert ids(pipeline="alpha", status="SUCCESS") == ["ok-2"]
    assert sql(database_url, "SELECT count(*) FROM durapipe.run_keys WHERE status IS NULL "
               "AND parent_workflow_id IS NULL") == [(0,)]


RUNS = 5_000


def test_one_run_queries_use_indexes_with_many_runs_recorded(
        make_app: Callable[..., App], database_url: str) -> None:
    """Bulk rows shaped like real ones (a run, one child workflow, three steps); the one-run
    queries and `runs -p` never scan DBOS's tables or the run keys."""
    app, alpha, _ = build(make_app)
    with app:
        alpha.run({"n": 1}, run_id="seed")
    install_views(database_url)
    with psycopg.connect(database_url, autocommit=True) as con:
        con.execute(f"""
            INSERT INTO dbos.workflow_status (workflow_uuid, status, name, created_at, completed_at,
                                              application_name, parent_workflow_id)
            SELECT 'r' || g, 'SUCCESS', 'durapipe.run:alpha', 1700000000000 + g * 1000,
                   1700000000000 + g * 1000 + 5, 'keys-app', NULL FROM generate_series(1, {RUNS}) g
            UNION ALL
            SELECT 'r' || g || '/0.1.0:a2', 'SUCCESS', 'durapipe.run', 1700000000000 + g * 1000 + 1,
                   1700000000000 + g * 1000 + 3, 'keys-app', 'r' || g FROM generate_series(1, {RUNS}) g""")
        con.execute(f"""
            INSERT INTO dbos.workflow_input (workflow_uuid, inputs)
            SELECT 'r' || g, '{{"positionalArgs": ["alpha", "v1", {{"n": ' || g || '}}]}}'
            FROM generate_series(1, {RUNS}) g
            UNION ALL
            SELECT 'r' || g || '/0.1.0:a2',
                   '{{"positionalArgs": ["alpha", "v1", {{"n": ' || g || '}}, "0.1.0", "r' || g || '"]}}'
            FROM generate_series(1, {RUNS}) g""")
        con.execute(f"""
            INSERT INTO dbos.operation_outputs (workflow_uuid, function_id, function_name, output,
                                                started_at_epoch_ms, completed_at_epoch_ms,
                                                child_workflow_id)
            SELECT 'r' || g, f, CASE f WHEN 0 THEN '0.0:a1' ELSE 'durapipe.run' END, '{{"a1": 2}}',
                   1700000000000 + g * 1000, 1700000000000 + g * 1000 + 2,
                   CASE f WHEN 1 THEN 'r' || g || '/0.1.0:a2' END
            FROM generate_series(1, {RUNS}) g, generate_series(0, 1) f""")
        for table in ("dbos.workflow_status", "dbos.workflow_input", "dbos.operation_outputs",
                      "durapipe.run_keys"):
            con.execute(f"ANALYZE {table}")

        def plan(query: str, params: Any = None) -> str:
            return "\n".join(r[0] for r in con.execute("EXPLAIN " + query, params).fetchall())

        one_run = [
            "SELECT * FROM durapipe.runs WHERE run_id = 'r777'",
            "SELECT * FROM durapipe.steps WHERE run_id = 'r777'",
            "SELECT * FROM durapipe.llm_calls WHERE run_id = 'r777'",
            "SELECT * FROM durapipe.background_tasks WHERE run_id = 'r777'",
            # The README's "slowest nodes this week": the bulk runs are older than a week.
            "SELECT pipeline, node_path, node_name, count(*), round(avg(duration_ms)) AS avg_ms "
            "FROM durapipe.steps WHERE kind = 'step' AND started > now() - interval '7 days' "
            "GROUP BY 1, 2, 3 ORDER BY avg_ms DESC LIMIT 10",
        ]
        for query in one_run:
            found = plan(query)
            assert "Seq Scan on workflow_status" not in found, (query, found)
            assert "Seq Scan on run_keys" not in found, (query, found)
            assert "Seq Scan on operation_outputs" not in found, (query, found)
        # A time filter reads the run keys through an index on created (which one, and how
        # the rest is joined, is the planner's choice: Postgres 18 may skip-scan (app, created)).
        recent = plan("SELECT * FROM durapipe.runs WHERE created >= to_timestamp(1700000000 + 4990)")
        assert re.search(r"Index (Only )?Scan( Backward)? using run_keys_\w+ on run_keys"
                         r"|Bitmap Index Scan on run_keys_\w+", recent), recent
        assert "Seq Scan on run_keys" not in recent, recent
        deep = RunQuery(pipeline="alpha", status="SUCCESS", cursor=f"{1700000000000 + 2500 * 1000}:r2500")
        found = plan(deep.sql(), deep.params(51))
        assert "Scan Backward using run_keys_" in found and "Seq Scan" not in found, found
        assert sql(database_url, "SELECT node_path, kind FROM durapipe.steps WHERE run_id = 'r777' "
                   "ORDER BY step_id") == [("0.0", "step"), ("0.1.0", "child")]
    with Admin(database_url) as admin:
        page = admin.list_runs(pipeline="alpha", limit=3)
        assert [r.run_id for r in page] == ["seed", f"r{RUNS}", f"r{RUNS - 1}"]


@pytest.mark.parametrize("url_kind", ["sqlite"])
def test_sqlite_lists_runs_by_pipeline_name(url_kind: str, tmp_path: Any) -> None:
    app = App("keys-lite", database_url=f"sqlite:///{tmp_path}/keys.sqlite")
    alpha = app.pipeline("alpha", fn(count("l1")))
    beta = app.pipeline("beta", fn(count("l2")))
    try:
        with app:
            alpha.run({}, run_id="la")
            beta.run({}, run_id="lb")
            assert [w.workflow_id for w in DBOS.list_workflows(name="durapipe.run:beta")] == ["lb"]
    finally:
        app.shutdown()
    with Admin(f"sqlite:///{tmp_path}/keys.sqlite") as admin:
        assert [r.run_id for r in admin.list_runs(pipeline="alpha")] == ["la"]
        assert sorted(r.run_id for r in admin.list_runs()) == ["la", "lb"]
