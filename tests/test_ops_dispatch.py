"""Background tasks through the operator surfaces: the background_tasks view and the
`durapipe show` tree. Needs the dispatch feature (``durapipe.dispatch``/``join``)."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from dbutil import sql
from durapipe import App, dispatch, fn, join
from durapipe.audit import install_views
from durapipe.cli import cli


def seo(state: dict[str, Any]) -> dict[str, Any]:
    return {"keywords": ["a", "b"]}


def mail(state: dict[str, Any]) -> dict[str, Any]:
    return {"mailed": True}


def fmt(state: dict[str, Any]) -> dict[str, Any]:
    return {"html": "<p/>"}


def test_background_tasks_view_and_show_tree(database_url: str) -> None:
    app = App("ops-dispatch", database_url)
    p = app.pipeline("blog", dispatch(fn(seo), fn(mail), names=["seo", "email"]) >> fn(fmt) >> join("seo"))
    with app:
        state = p.run({}, run_id="d1").state
    assert state["keywords"] == ["a", "b"] and state["mailed"] is True  # email auto-joined at the end
    install_views(database_url)
    rows = sql(database_url, "SELECT task, status, child_status, child_workflow_id FROM "
                             "durapipe.background_tasks WHERE run_id = 'd1' ORDER BY task")
    assert [(r[0], r[1], r[2]) for r in rows] == [("email", "auto_joined", "SUCCESS"),
                                                  ("seo", "joined", "SUCCESS")]
    assert all(r[3].startswith("d1/") for r in rows)
    steps = sql(database_url, "SELECT node_name FROM durapipe.steps WHERE run_id = 'd1' AND kind = 'step'")
    assert {"seo", "mail", "fmt"} <= {s[0] for s in steps}
    res = CliRunner().invoke(cli, ["show", "d1", "--json", "--database-url", database_url])
    tasks = {n["detail"]["task"]: n["detail"]["task_status"]
             for n in json.loads(res.output)["nodes"] if n["kind"] == "task"}
    assert tasks == {"seo": "joined", "email": "auto_joined"}
