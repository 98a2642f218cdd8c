"""The audit views on Postgres: install them, run real pipelines, read every view."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dbutil import sql
from durapipe.audit import install_views, views_sql
from durapipe.errors import NodeFailed, OperatorError
from ops import blog_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def recorded(database_url: str) -> str:
    app = blog_app.app
    app.database_url = database_url
    try:
        with app:
            blog_app.publish.run({"topic": "durable AI"}, run_id="p1")
            with pytest.raises(NodeFailed):
                blog_app.broken.run({}, run_id="b1")
    finally:
        app.shutdown()
    install_views(database_url)
    return database_url


def test_runs_view(recorded: str) -> None:
    rows = sql(recorded, "SELECT run_id, app, pipeline, status, duration_ms >= 0, error, inputs "
                         "FROM durapipe.runs ORDER BY run_id")
    assert rows == [
        ("b1", "ops-blog", "broken", "ERROR", True,
         "NodeFailed: node 0:explode failed: ValueError: no luck today", {}),
        ("p1", "ops-blog", "publish", "SUCCESS", True, None, {"topic": "durable AI"}),
    ]
    (output,) = sql(recorded, "SELECT output FROM durapipe.runs WHERE run_id = 'p1'")[0]
    assert output["twice"] == 2 * output["words"] and output["done"] is True


def test_steps_view_maps_rows_to_nodes_and_child_workflows(recorded: str) -> None:
    rows = sql(recorded, "SELECT workflow_id, node_path, node_name, kind, status, duration_ms >= 0 "
                         "FROM durapipe.steps WHERE run_id = 'p1' AND kind <> 'dbos-op' "
                         "ORDER BY node_path")
    # The branch count >> double has a fixed shape: its steps are the parent's, no child.
    assert rows == [
        ("p1", "0.0", "writer", "step", "SUCCESS", True),
        ("p1", "0.1.0", "editor", "step", "SUCCESS", True),
        ("p1", "0.1.1.0", "count", "step", "SUCCESS", True),
        ("p1", "0.1.1.1", "double", "step", "SUCCESS", True),
        ("p1", "0.2", "finish", "step", "SUCCESS", True),
    ]
    assert sql(recorded, "SELECT node_name, status, error FROM durapipe.steps WHERE run_id = 'b1'") == [
        ("explode", "ERROR", "ValueError: no luck today")
    ]
    assert sql(recorded, "SELECT count(*) FROM durapipe.steps WHERE kind = 'dbos-op' "
                         "AND node_name = 'DBOS.getResult'") == [(0,)]


def test_llm_calls_view(recorded: str) -> None:
    rows = sql(recorded, "SELECT run_id, node_path, agent, model, input_tokens, output_tokens, "
                         "latency_ms >= 0 FROM durapipe.llm_calls ORDER BY node_path")
    assert rows == [("p1", "0.0", "writer", "fake", 2, 5, True),
                    ("p1", "0.1.0", "editor", "fake", 0, 2, True)]


def test_background_and_approval_views_exist_and_are_empty_without_tasks(recorded: str) -> None:
    assert sql(recorded, "SELECT count(*) FROM durapipe.background_tasks") == [(0,)]
    assert sql(recorded, "SELECT count(*) FROM durapipe.approvals") == [(0,)]


def test_readme_audit_queries_run(recorded: str) -> None:
    text = (ROOT / "sql" / "README.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", text, re.S)
    assert len(queries) >= 5
    for q in queries:
        sql(recorded, q)
    slowest = sql(recorded, queries[0])
    assert slowest and all(isinstance(r[0], str) for r in slowest)


def test_install_is_idempotent_and_shipped_in_the_package(recorded: str) -> None:
    install_views(recorded)
    assert "CREATE OR REPLACE VIEW durapipe.runs" in views_sql()
    assert (ROOT / "sql" / "views.sql").read_text() == views_sql()


def test_install_refuses_non_postgres_and_databases_without_dbos(database_url: str) -> None:
    with pytest.raises(OperatorError, match="need Postgres"):
        install_views("sqlite:///x.sqlite")
    with pytest.raises(OperatorError, match="no DBOS tables"):
        install_views(database_url)
