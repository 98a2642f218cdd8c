"""Starting many runs at once: app.batch() and pipeline.start_many()."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from dbutil import sql
from durapipe import App, DurapipeError, StateError, fn


def test_a_batch_of_100_runs_with_repeated_ids_starts_each_run_once(
        make_app: Callable[..., App], database_url: str) -> None:
    ran: Counter[str] = Counter()
    lock = threading.Lock()

    def count(state: dict[str, Any]) -> dict[str, Any]:
        with lock:
            ran[state["who"]] += 1
        return {"seen": state["who"]}

    def other(state: dict[str, Any]) -> dict[str, Any]:
        with lock:
            ran["other:" + state["who"]] += 1
        return {"other": True}

    app = make_app("batch-app")
    one = app.pipeline("one", fn(count))
    two = app.pipeline("two", fn(other))
    with app:
        one.run({"who": "r-0"}, run_id="r-0")  # exists before the batch
        with app.batch() as batch:
            for i in range(100):
                rid = f"r-{i % 60}"  # 40 ids repeated within the batch
                batch.add(one, {"who": rid, "try": i}, run_id=rid)
            batch.add(two, {"who": "x"}, run_id="o-1")
            batch.add(two, {"who": "x"})  # a generated id
            batch.add(two, {"who": "x", "again": True}, run_id="o-1")  # repeated, other pipeline
        handles = batch.handles
        assert len(handles) == 103 and handles[100].run_id == handles[102].run_id == "o-1"
        assert "again" not in handles[102].result(timeout=60).state  # the first item's inputs
        assert [h.run_id for h in handles[:100]] == [f"r-{i % 60}" for i in range(100)]
        results = {h.run_id: h.result(timeout=60) for h in handles}
        assert {rid: r.state["seen"] for rid, r in results.items() if rid.startswith("r-")} \
            == {f"r-{i}": f"r-{i}" for i in range(60)}
        # The first item of an id gives its inputs; the run that existed is not run again.
        assert results["r-5"].state["try"] == 5 and "try" not in results["r-0"].state
        assert ran == Counter({**{f"r-{i}": 1 for i in range(60)}, "other:x": 2})
        # The same batch again starts nothing and gives the same runs.
        again = one.start_many([{"who": f"r-{i}"} for i in range(60)],
                               run_ids=[f"r-{i}" for i in range(60)])
        assert [h.result(timeout=60).state["seen"] for h in again] == [f"r-{i}" for i in range(60)]
        assert sum(ran.values()) == 62
    assert sql(database_url, "SELECT count(*), count(*) FILTER (WHERE status = 'SUCCESS') "
                             "FROM dbos.workflow_status WHERE parent_workflow_id IS NULL") == [(62, 62)]


def test_a_bad_item_fails_the_batch_before_anything_starts(make_app: Callable[..., App],
                                                            database_url: str) -> None:
    app = make_app("batch-bad")
    need = app.pipeline("need", fn(lambda s: None, name="noop"), inputs=["topic"])
    other = app.pipeline("other", fn(lambda s: None, name="noop2"))
    with app:
        batch = app.batch().add(need, {"topic": "a"}, run_id="ok")
        with pytest.raises(StateError, match="needs input 'topic'"):
            batch.add(need, {}, run_id="bad")
        batch.add(other, {}, run_id="ok")
        with pytest.raises(DurapipeError, match="run id 'ok' is given to pipeline 'need' and to 'other'"):
            batch.start()
        with pytest.raises(DurapipeError, match="2 inputs but 1 run ids"):
            need.start_many([{"topic": "a"}, {"topic": "b"}], run_ids=["x"])
    assert sql(database_url, "SELECT count(*) FROM dbos.workflow_status") == [(0,)]
