"""The dispatch audit costs no write of its own: what a dispatch and a join record, and how
the background_tasks view, `durapipe show` and ``RunHandle.progress`` read it."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from dbutil import sql, wait_for
from durapipe import App, dispatch, fn, join, progress, until
from durapipe.audit import install_views
from durapipe.engine.admin import Admin

MakeApp = Callable[..., App]


def rows(url: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    """A query on the DBOS tables of Postgres (schema dbos) or SQLite (no schema)."""
    if url.startswith("sqlite"):
        query = query.replace("dbos.", "")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            return [tuple(r) for r in con.execute(sa.text(query), params)]
    finally:
        engine.dispose()


def work(state: dict[str, Any]) -> dict[str, Any]:
    progress({"pct": 100})
    return {"seo": "kw"}


def test_dispatch_and_join_record_only_what_raw_dbos_records(any_database_url: str) -> None:
    url = any_database_url
    app = App("audit", url)
    p = app.pipeline("p", dispatch(fn(work), names=["seo"], progress_key="seo_progress")
                     >> fn(lambda s: {"x": 1}, name="x") >> join())
    try:
        with app:
            handle = p.start({}, run_id="r")
            state = handle.result(timeout=30).state
            # The handle finds the task from its workflow row (no event names it).
            assert handle.progress("seo") == {"pct": 100}
    finally:
        app.shutdown()
    assert state["seo"] == "kw" and state["seo_progress"] == {"pct": 100}
    child = "r/0.0.0:seo"
    ops = rows(url, "SELECT function_name, child_workflow_id FROM dbos.operation_outputs "
                    "WHERE workflow_uuid = 'r' ORDER BY function_id")
    # The start of the child and the join naming it, as raw DBOS records them; the progress
    # reads (getEvent and its timeout) are the progress_key's (a dispatch without one has none).
    assert [o for o in ops if o[0] not in ("DBOS.getEvent", "DBOS.sleep")] == [
        ("durapipe.task", child), ("0.1:x", None), ("DBOS.getResult", child)]
    assert rows(url, "SELECT key FROM dbos.workflow_events WHERE workflow_uuid = 'r'") == []
    (attrs,) = rows(url, "SELECT attributes FROM dbos.workflow_status "
                         "WHERE workflow_uuid = :c", c=child)[0]
    assert (json.loads(attrs) if isinstance(attrs, str) else attrs) == {"durapipe.task": "seo"}
    with Admin(url) as admin:
        nodes = [n for n in admin.tree("r").nodes if n.kind == "task"]
    assert [(n.path, n.detail["task"], n.detail["task_status"]) for n in nodes] == [
        ("0.0.0", "seo", "joined")]


def test_view_shows_running_then_joined_and_one_row_per_loop_pass(
    make_app: MakeApp, database_url: str
) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(state: dict[str, Any]) -> dict[str, Any]:
        started.set()
        release.wait(20)
        return {"slow": True}

    def count(state: dict[str, Any]) -> dict[str, Any]:
        return {"n": state.get("n", 0) + 1}

    app = make_app()
    live = app.pipeline("live", dispatch(fn(slow)) >> join())
    looped = app.pipeline("looped", (dispatch(fn(count), names=["c"]) >> join())
                          * until(lambda s: s.get("n", 0) >= 2, max=3))
    query = ("SELECT task, status, status_at IS NOT NULL, child_status, node_path, "
             "child_workflow_id FROM durapipe.background_tasks WHERE run_id = %s "
             "ORDER BY started")
    with app:
        install_views(database_url)
        handle = live.start({}, run_id="live")
        assert started.wait(20)
        # The join waits: the task is running, and the view says so.
        wait_for(lambda: sql(database_url, query, "live") != [], what="task row")
        assert sql(database_url, query, "live")[0][:4] == ("slow", "running", True, "PENDING")
        release.set()
        handle.result(timeout=30)
        assert sql(database_url, query, "live")[0][:4] == ("slow", "joined", True, "SUCCESS")
        assert looped.run({}, run_id="loop").state["n"] == 2
    passes = sql(database_url, query, "loop")
    assert [(t, st, cs) for t, st, _, cs, _, _ in passes] == [("c", "joined", "SUCCESS")] * 2
    assert len({r[5] for r in passes}) == 2 and all("#" in r[4] for r in passes)
