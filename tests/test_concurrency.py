"""Many runs at once on one Postgres: all complete, and no step is recorded twice."""

from __future__ import annotations

from typing import Any

from dbutil import sql
from durapipe import Agent, App, FakeModel, RunStatus, fn


def stamp(state: dict[str, Any]) -> dict[str, Any]:
    return {"stamped": state["i"]}


def test_fifty_concurrent_runs(database_url: str) -> None:
    app = App("conc-app", database_url, model=FakeModel(lambda r: r.prompt.upper()))
    p = app.pipeline("p", fn(stamp) >> (Agent("a").instruct("a{i}") | Agent("b").instruct("b{i}")) >> fn(stamp, name="again"))
    with app:
        handles = [p.start({"i": i}, run_id=f"conc-{i}") for i in range(50)]
        results = [h.result(timeout=120) for h in handles]
    assert all(r.status is RunStatus.SUCCESS for r in results)
    assert [r.state["a"] for r in results] == [f"A{i}" for i in range(50)]
    dupes = sql(database_url, """
        SELECT workflow_uuid, function_name, count(*) FROM dbos.operation_outputs
        WHERE workflow_uuid LIKE 'conc-%' GROUP BY 1, 2 HAVING count(*) > 1""")
    assert dupes == []
    assert sql(database_url, "SELECT count(*) FROM dbos.operation_outputs WHERE workflow_uuid LIKE 'conc-%'") == [(200,)]
    assert sql(database_url, "SELECT count(*) FROM dbos.workflow_status WHERE workflow_uuid LIKE 'conc-%' AND status='SUCCESS'") == [(50,)]
