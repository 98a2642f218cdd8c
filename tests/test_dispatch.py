"""dispatch / join semantics on Postgres: ordering by recorded timestamps, each rule."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from dbutil import sql
from durapipe import (
    Agent,
    App,
    BuildError,
    DurapipeError,
    FakeModel,
    NodeFailed,
    dispatch,
    fn,
    join,
    progress,
)
from durapipe.audit import install_views
from durapipe.errors import UnknownTask

MakeApp = Callable[..., App]


def steps(url: str, workflow_id: str) -> dict[str, tuple[int, int]]:
    """Step name -> (started, completed) epoch ms of one workflow."""
    rows = sql(url, "SELECT function_name, started_at_epoch_ms, completed_at_epoch_ms "
                    "FROM dbos.operation_outputs WHERE workflow_uuid = %s", workflow_id)
    return {name: (start, end) for name, start, end in rows}


def tasks(url: str, run_id: str) -> dict[str, dict[str, Any]]:
    """Task name -> status, child workflow id and path, from the background_tasks view."""
    install_views(url)
    rows = sql(url, "SELECT task, status, child_workflow_id, node_path "
                    "FROM durapipe.background_tasks WHERE run_id = %s", run_id)
    return {t: {"status": st, "child": child, "path": path} for t, st, child, path in rows}


def status(url: str, workflow_id: str) -> str:
    return str(sql(url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s",
                   workflow_id)[0][0])


RESPONSES = {"writer": "draft", "email_sender": "sent", "seo_optimizer": "kw", "formatter": "html"}
MODEL = FakeModel(RESPONSES, delay={"email_sender": 1.0, "seo_optimizer": 0.5})
writer = Agent("writer").writes("draft")
email = Agent("email_sender").instruct("Announce {draft}").writes("email_status")
seo = Agent("seo_optimizer").instruct("Keywords {draft}").writes("seo")
formatter = Agent("formatter").instruct("Format {draft}").writes("html")


def publish(state: dict[str, Any]) -> dict[str, Any]:
    return {"published": [state["html"], state["seo"], state["email_status"]]}


def test_formatter_runs_while_background_tasks_run(make_app: MakeApp, database_url: str) -> None:
    app = make_app(model=MODEL)
    p = app.pipeline("p", writer >> dispatch(email, seo) >> formatter >> join() >> fn(publish))
    with app:
        state = p.run({}, run_id="r").state
    assert state["published"] == ["html", "kw", "sent"]
    main = steps(database_url, "r")
    em = steps(database_url, "r/0.1.0:email_sender")["0.1.0:email_sender"]
    se = steps(database_url, "r/0.1.1:seo_optimizer")["0.1.1:seo_optimizer"]
    # The formatter finished before either background task did.
    assert main["0.2:formatter"][1] < min(em[1], se[1])
    # The tasks overlapped (run concurrently, not one after the other).
    assert em[0] < se[1] and se[0] < em[1]
    # The publisher ran after both were joined.
    assert main["0.4:publish"][0] >= max(em[1], se[1])
    ev = tasks(database_url, "r")
    assert ev["email_sender"]["status"] == "joined"
    assert ev["email_sender"]["child"] == "r/0.1.0:email_sender"
    assert ev["seo_optimizer"]["path"] == "0.1.1"


def test_named_joins_in_order(make_app: MakeApp, database_url: str) -> None:
    # email runs 2.5 s longer than seo: room for the publisher on a loaded machine.
    app = make_app(model=FakeModel(RESPONSES, delay={"email_sender": 3.0,
                                                                  "seo_optimizer": 0.5}))
    p = app.pipeline("p", writer >> dispatch(email, seo, names=["email", "seo"]) >> formatter
                     >> join("seo", timeout=30) >> fn(lambda s: {"pub": s["seo"]}, name="publisher")
                     >> join("email"))
    with app:
        state = p.run({}, run_id="r").state
    assert state["pub"] == "kw" and state["email_status"] == "sent"
    pub = steps(database_url, "r")["0.4:publisher"]
    em = steps(database_url, "r/0.1.0:email")["0.1.0:email_sender"]
    se = steps(database_url, "r/0.1.1:seo")["0.1.1:seo_optimizer"]
    assert se[1] <= pub[0] < em[1]  # published after seo, while email still ran
    ev = tasks(database_url, "r")
    assert ev["seo"]["status"] == "joined" and ev["email"]["status"] == "joined"


def test_join_timeout_cancels_and_drops_writes(make_app: MakeApp, database_url: str) -> None:
    release = threading.Event()

    def slow(state: dict[str, Any]) -> dict[str, Any]:
        release.wait(20)
        return {"slow": True}

    app = make_app()
    p = app.pipeline("p", dispatch(fn(slow), fn(lambda s: {"fast": 1}, name="fast"))
                     >> join(timeout=3) >> fn(lambda s: {"after": sorted(s)}, name="after"))
    try:
        with app:
            state = p.run({}, run_id="r").state
            assert state["after"] == ["fast"]
            assert "slow" not in state
            ev = tasks(database_url, "r")
            assert ev["slow"]["status"] == "timed_out"
            assert ev["fast"]["status"] == "joined"
            assert status(database_url, "r/0.0.0:slow") == "CANCELLED"
            deadline = steps(database_url, "r")["0.1:join:deadline"]
            assert deadline[0] > 0
    finally:
        release.set()


def test_failed_task_fails_join_naming_it(make_app: MakeApp, database_url: str) -> None:
    def broken(state: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("smtp down")

    app = make_app()
    p = app.pipeline("p", dispatch(fn(broken), names=["email"]) >> fn(lambda s: {"x": 1}, name="x")
                     >> join() >> fn(lambda s: {"y": 1}, name="y"))
    with app:
        with pytest.raises(NodeFailed, match=r"background task 'email'.*smtp down") as e:
            p.run({}, run_id="r")
    assert e.value.task == "email"
    assert tasks(database_url, "r")["email"]["status"] == "failed"
    assert "0.3:y" not in steps(database_url, "r")
    assert status(database_url, "r/0.0.0:email") == "ERROR"


def test_callbacks_run_once_and_on_error_lets_join_go_on(make_app: MakeApp, database_url: str) -> None:
    calls: list[tuple[str, str, Any]] = []

    def broken(state: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("smtp down")

    async def done(name: str, result: dict[str, Any]) -> None:
        calls.append(("done", name, result))

    def failed(name: str, exc: BaseException) -> None:
        calls.append(("failed", name, str(exc)))

    app = make_app()
    p = app.pipeline("p", dispatch(fn(broken), fn(lambda s: {"ok": 1}, name="good"),
                                   on_complete=done, on_error=failed)
                     >> join() >> fn(lambda s: {"after": sorted(s)}, name="after"))
    with app:
        state = p.run({}, run_id="r").state
    assert state["after"] == ["ok"]
    assert sorted(c[:2] for c in calls) == [("done", "good"), ("failed", "broken")]
    assert ("done", "good", {"ok": 1}) in calls
    assert "smtp down" in next(c[2] for c in calls if c[0] == "failed")
    ev = tasks(database_url, "r")
    assert ev["broken"]["status"] == "failed" and ev["good"]["status"] == "joined"
    assert "0.0.1:on_complete" in steps(database_url, "r/0.0.1:good")
    assert "0.0.0:on_error" in steps(database_url, "r/0.0.0:broken")


def test_progress_is_seen_by_later_nodes_and_handle(make_app: MakeApp, database_url: str) -> None:
    published, release = threading.Event(), threading.Event()

    def work(state: dict[str, Any]) -> dict[str, Any]:
        progress({"pct": 10})
        progress({"pct": 50})
        published.set()
        release.wait(20)
        return {"seo": "kw"}

    def wait_published(state: dict[str, Any]) -> None:
        published.wait(20)

    app = make_app()
    p = app.pipeline("p", dispatch(fn(work), names=["seo"], progress_key="seo_progress")
                     >> fn(wait_published) >> fn(lambda s: {"seen": s["seo_progress"]}, name="look")
                     >> join() >> fn(lambda s: {"final": s["seo_progress"]}, name="final"))
    with app:
        handle = p.start({}, run_id="r")
        published.wait(20)
        assert handle.progress("seo") == {"pct": 50}
        with pytest.raises(UnknownTask, match="no dispatch .* named 'nope'"):
            handle.progress("nope")
        release.set()
        state = handle.result(timeout=30).state
    assert state["seen"] == {"pct": 50} and state["final"] == {"pct": 50}
    assert state["seo"] == "kw"
    # The value the look node saw is checkpointed in the run, so a replay sees it too.
    outputs = sql(database_url, "SELECT output FROM dbos.operation_outputs WHERE workflow_uuid='r' "
                                "AND function_name = 'DBOS.getEvent' ORDER BY function_id")
    assert json.loads(outputs[1][0]) == {"pct": 50}


def test_unjoined_task_is_joined_at_the_end(make_app: MakeApp, database_url: str) -> None:
    app = make_app()
    p = app.pipeline("p", fn(lambda s: {"a": 1}, name="a")
                     >> dispatch(fn(lambda s: {"bg": "done"}, name="bg")))
    with app:
        state = p.run({}, run_id="r").state
    assert state == {"a": 1, "bg": "done"}
    assert tasks(database_url, "r")["bg"]["status"] == "auto_joined"


def test_max_tasks_bounds_concurrency(make_app: MakeApp, database_url: str) -> None:
    def task(i: int) -> Any:
        def body(state: dict[str, Any]) -> dict[str, Any]:
            import time
            time.sleep(0.2)
            return {f"t{i}": i}
        return fn(body, name=f"t{i}")

    app = make_app()
    p = app.pipeline("p", dispatch(task(0), task(1), task(2), max_tasks=1) >> join())
    with app:
        state = p.run({}, run_id="r").state
    assert {state[f"t{i}"] for i in range(3)} == {0, 1, 2}
    spans = sorted(steps(database_url, f"r/0.0.{i}:t{i}")[f"0.0.{i}:t{i}"] for i in range(3))
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start  # never two at once
    queue = sql(database_url, "SELECT DISTINCT queue_name FROM dbos.workflow_status "
                              "WHERE workflow_uuid LIKE 'r/%%'")
    assert queue == [("durapipe-test-app-max1",)]


def test_build_errors() -> None:
    with pytest.raises(BuildError, match="task name 'a' appears twice"):
        dispatch(fn(publish), fn(publish), names=["a", "a"])
    with pytest.raises(BuildError, match="'publish' appears twice"):
        dispatch(fn(publish), fn(publish))
    with pytest.raises(BuildError, match="2 nodes but 1 names"):
        dispatch(fn(publish), fn(publish, name="b"), names=["a"])
    with pytest.raises(BuildError, match="max_tasks must be an int >= 1"):
        dispatch(fn(publish), max_tasks=0)
    with pytest.raises(BuildError, match="timeout must be a number"):
        join(timeout=-1)
    app = App("build-app", "sqlite:///unused.sqlite")
    with pytest.raises(BuildError, match="no dispatch upstream starts a task named 'seo'"):
        app.pipeline("p", dispatch(fn(publish), names=["email"]) >> join("seo"))
    with pytest.raises(BuildError, match="already used by an earlier dispatch"):
        app.pipeline("q", dispatch(fn(publish), names=["x"]) >> dispatch(fn(publish), names=["x"]))


def test_progress_outside_a_run_is_an_error() -> None:
    with pytest.raises(DurapipeError, match="outside a running pipeline"):
        progress(1)


def test_a_second_join_of_a_joined_task_is_a_build_error(make_app: MakeApp) -> None:
    """It used to fail only at run time ("no background task named 't' is pending"); a join
    with nothing left to join is refused when the pipeline is registered."""
    app = make_app()
    with pytest.raises(BuildError, match="task 't' is joined already by a join upstream"):
        app.pipeline("p", dispatch(fn(publish, name="t"), names=["t"]) >> join("t") >> join("t"))
    with pytest.raises(BuildError, match="join 0.2: there is nothing to join here"):
        app.pipeline("q", dispatch(fn(publish, name="t"), names=["t"]) >> join() >> join())


def test_a_task_name_joined_may_be_dispatched_again(make_app: MakeApp) -> None:
    app = make_app()
    p = app.pipeline("p", dispatch(fn(lambda s: {"first": 1}, name="a"), names=["t"]) >> join()
                     >> dispatch(fn(lambda s: {"second": s["first"] + 1}, name="b"), names=["t"])
                     >> join())
    with app:
        state = p.run({}, run_id="again").state
    assert state["first"] == 1 and state["second"] == 2
