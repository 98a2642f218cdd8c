"""Step rows written by durapipe's lean path (engine/steps.py) against DBOS's own step path.

Each behaviour runs under ``App(steps="lean")`` (the default on Postgres) and
``App(steps="dbos")`` (``DBOS.run_step``) and must come out the same: the same rows (one
run on each path, compared row for row, each written by the path it names), the same
replay, cancellation stopping before the next step, retries, recorded errors.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from dbos import DBOS
from dbos._serialization import PortableWorkflowError
from dbos._sys_db import SystemDatabase

from dbutil import sql, wait_for
from durapipe import App, NodeFailed, RunCancelled, RunStatus, dispatch, fn, join, transform
from durapipe.engine.steps import StepLog
from durapipe.errors import AppStateError

MODES = ["lean", "dbos"]


def _rows(url: str, run_id: str) -> list[tuple[Any, ...]]:
    """What a step row says, without the timestamps (checked for sanity separately)."""
    rows = sql(url, "SELECT function_id, function_name, output, error IS NOT NULL, serialization, "
                    "child_workflow_id, application_name, started_at_epoch_ms <= completed_at_epoch_ms, "
                    "retention_timestamp > 0 FROM dbos.operation_outputs WHERE workflow_uuid = %s "
                    "ORDER BY function_id", run_id)
    return [r for r in rows]


def _mixed(app: App, calls: dict[str, int]) -> Any:
    def count(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    def one(s: dict[str, Any]) -> dict[str, Any]:
        count("one")
        return {"n": s["n"] + 1, "text": "ünïcode ' ; \" ok"}

    async def two(s: dict[str, Any]) -> dict[str, Any]:
        count("two")
        await asyncio.sleep(0)
        return {"n": s["n"] * 10}

    def flaky(s: dict[str, Any]) -> dict[str, Any]:
        count("flaky")
        if calls["flaky"] < 3:
            raise ConnectionError(f"try {calls['flaky']}")
        return {"flaky": calls["flaky"]}

    def branch(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def f(s: dict[str, Any]) -> dict[str, Any]:
            count(name)
            return {name: s["n"]}
        f.__name__ = name
        return f

    return app.pipeline(
        "mixed",
        fn(one) >> fn(two) >> fn(flaky, retries=2)
        >> ((fn(branch("a1")) >> fn(branch("a2"))) | fn(branch("b1"))) >> fn(lambda s: None, name="end"),
    )


def _writers(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Which code wrote each step row: durapipe's one statement or DBOS's own path.

    Both writers are wrapped, not replaced: every row still goes to Postgres.
    """
    seen: dict[str, list[str]] = {"lean": [], "dbos": []}
    lean_write, dbos_record = StepLog.write, SystemDatabase.record_operation_result

    def write(self: StepLog, step: Any, name: str, *args: Any, **kwargs: Any) -> None:
        seen["lean"].append(name)
        lean_write(self, step, name, *args, **kwargs)

    def record(self: SystemDatabase, result: Any, **kwargs: Any) -> None:
        seen["dbos"].append(result["function_name"])
        dbos_record(self, result, **kwargs)

    monkeypatch.setattr(StepLog, "write", write)
    monkeypatch.setattr(SystemDatabase, "record_operation_result", record)
    return seen


def test_rows_and_results_are_the_same_on_both_paths(
        make_app: Callable[..., App], database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One run on each path, on one database: the lean path wrote every step row with its
    one statement, DBOS.run_step wrote the other run's, and the rows are the same."""
    writers = _writers(monkeypatch)
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for steps in MODES:
        calls: dict[str, int] = {}
        app = make_app("steps-app", steps=steps)
        p = _mixed(app, calls)
        writers["lean"].clear()
        writers["dbos"].clear()
        with app:
            assert (app.step_log() is not None) is (steps == "lean")
            result = p.run({"n": 1}, run_id=f"same-{steps}")
            recorded = DBOS.list_workflow_steps(f"same-{steps}")
        assert result.status is RunStatus.SUCCESS
        assert result.state["n"] == 20 and result.state["flaky"] == 3
        assert result.state["a2"] == 20 and result.state["b1"] == 20
        assert calls == {"one": 1, "two": 1, "flaky": 3, "a1": 1, "a2": 1, "b1": 1}
        rows[steps] = _rows(database_url, f"same-{steps}")
        names = [r[1] for r in rows[steps]]
        # flaky's retries=2 is a durable policy: each failed attempt and its decision a row.
        assert names == ["0.0:one", "0.1:two", "0.2:flaky", "0.2:retry", "0.2#1:flaky", "0.2#1:retry",
                         "0.2#2:flaky", "0.3.0.0:a1", "0.3.0.1:a2", "0.3.1:b1", "0.4:end"]
        # Every row came from the path the App was told to use, and only from it.
        other = "dbos" if steps == "lean" else "lean"
        assert sorted(writers[steps]) == sorted(names) and writers[other] == [], writers
        # DBOS's own reader understands the rows.
        assert [(s["function_id"], s["function_name"]) for s in recorded] == [r[:2] for r in rows[steps]]
        assert recorded[0]["output"] == {"n": 2, "text": "ünïcode ' ; \" ok"}
    # Row for row what DBOS.run_step writes (timestamps checked for order, not value; a
    # retry decision holds its backoff and wake time, drawn per run id, so those are left out).
    def comparable(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [(*r[:2], {k: v for k, v in json.loads(r[2]).items() if k not in ("wake_at", "delay")}, *r[3:])
                if r[1].endswith(":retry") else r for r in rows]
    assert comparable(rows["lean"]) == comparable(rows["dbos"])
    assert rows["lean"][0][2] == '{"n":2,"text":"ünïcode \' ; \\" ok"}'


@pytest.mark.parametrize("steps", MODES)
def test_recorded_error_is_replayed_not_rerun(steps: str, make_app: Callable[..., App],
                                              database_url: str) -> None:
    calls: list[str] = []

    def boom(s: dict[str, Any]) -> None:
        calls.append("boom")
        raise ValueError("disk on fire")

    def executions(s: dict[str, Any]) -> None:
        calls.append("execution")  # a pure node: runs on every execution of the workflow

    app = make_app(steps=steps)
    p = app.pipeline("p", transform(executions) >> fn(lambda s: {"a": 1}, name="first")
                     >> fn(boom, retries=1))
    with app:
        with pytest.raises(NodeFailed, match=r"node 0.2#1:boom failed: ValueError: disk on fire "
                                             r"\(node 0.2:boom gave up after 2 of 2 attempts"):
            p.run({}, run_id="err")
        assert calls == ["execution", "boom", "boom"]
        rows = sql(database_url, "SELECT function_id, function_name, error FROM dbos.operation_outputs "
                                 "WHERE workflow_uuid = 'err' ORDER BY function_id")
        assert [r[1] for r in rows] == ["0.1:first", "0.2:boom", "0.2:retry", "0.2#1:boom", "0.2#1:retry"]
        assert all("disk on fire" in r[2] for r in rows if r[1].endswith(":boom"))
        # A fork that keeps every recorded step replays them: the recorded error is raised
        # again without calling boom.
        forked = DBOS.fork_workflow("err", rows[-1][0] + 1)
        with pytest.raises(PortableWorkflowError, match="disk on fire"):
            forked.get_result()
    assert calls == ["execution", "boom", "boom", "execution"]


@pytest.mark.parametrize("steps", MODES)
def test_cancel_stops_before_the_next_step_and_resume_finishes(
        steps: str, make_app: Callable[..., App]) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def first(s: dict[str, Any]) -> dict[str, Any]:
        calls.append("first")
        return {"a": 1}

    def hold(s: dict[str, Any]) -> dict[str, Any]:
        calls.append("hold")
        started.set()
        release.wait(30)
        return {"b": 2}

    def after(s: dict[str, Any]) -> dict[str, Any]:
        calls.append("after")
        return {"c": 3}

    app = make_app(steps=steps)
    p = app.pipeline("p", fn(first) >> fn(hold) >> fn(after))
    with app:
        handle = p.start({}, run_id="cx")
        assert started.wait(30)
        DBOS.cancel_workflow("cx")
        release.set()
        wait_for(lambda: handle.status() is RunStatus.CANCELLED, what="cancelled")
        # The step in flight at the cancel may finish, but nothing after it starts.
        with pytest.raises(RunCancelled):
            handle.result(timeout=2)
        assert "after" not in calls
        started.clear()
        DBOS.resume_workflow("cx")
        assert app.get_run("cx").result(timeout=30).state == {"a": 1, "b": 2, "c": 3}
    # first ran once; hold's record was refused at the cancel, so it runs again on resume.
    assert calls == ["first", "hold", "hold", "after"]


@pytest.mark.parametrize("steps", MODES)
def test_a_step_renamed_under_a_recorded_run_is_refused(
        steps: str, make_app: Callable[..., App], database_url: str) -> None:
    app = make_app(steps=steps)
    p = app.pipeline("p", fn(lambda s: {"a": 1}, name="first") >> fn(lambda s: {"b": 2}, name="second"))
    with app:
        p.run({}, run_id="nd")
        sql(database_url, "UPDATE dbos.operation_outputs SET function_name = '0.0:other' "
                          "WHERE workflow_uuid = 'nd' AND function_id = 1")
        forked = DBOS.fork_workflow("nd", 2)
        with pytest.raises(PortableWorkflowError, match="DBOSUnexpectedStepError: .*0.0:other was recorded when 0.0:first was expected"):
            forked.get_result()


@pytest.mark.parametrize("steps", MODES)
def test_a_join_records_the_child_it_read_and_replays_it(
        steps: str, make_app: Callable[..., App], database_url: str) -> None:
    calls: list[str] = []

    def task(s: dict[str, Any]) -> dict[str, Any]:
        calls.append("task")
        return {"t": 1}

    app = make_app(steps=steps)
    p = app.pipeline("p", dispatch(fn(task), names=["bg"]) >> join() >> fn(lambda s: {"u": 2}, name="after"))
    with app:
        assert p.run({}, run_id="dj").state == {"t": 1, "u": 2}
        rows = sql(database_url, "SELECT function_id, function_name, child_workflow_id, output "
                                 "FROM dbos.operation_outputs WHERE workflow_uuid = 'dj' ORDER BY 1")
        assert [r[1:] for r in rows if r[1] == "DBOS.getResult"] == [
            ("DBOS.getResult", "dj/0.0.0:bg", '{"t":1}')]
        # A fork that keeps the join's row replays it: the task is not started again.
        keep = max(r[0] for r in rows if r[1] == "DBOS.getResult")
        forked = DBOS.fork_workflow("dj", keep + 1)
        assert forked.get_result() == {"t": 1, "u": 2}
    assert calls == ["task"]


def test_steps_option_is_checked() -> None:
    with pytest.raises(AppStateError, match=r"steps='fast'.*'lean'.*'dbos'"):
        App("steps-app", "postgresql://nowhere/db", steps="fast")


def test_sqlite_apps_use_dbos_steps(tmp_path: Any) -> None:
    app = App("steps-app", f"sqlite:///{tmp_path}/x.sqlite")
    p = app.pipeline("p", fn(lambda s: {"a": 1}, name="first"))
    with app:
        assert app.step_log() is None
        assert p.run({}).state == {"a": 1}


def test_a_dbos_table_of_another_shape_falls_back_to_dbos_steps(
        make_app: Callable[..., App], database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()
    with app:
        assert app.step_log() is not None
    # A DBOS release that adds a required column: durapipe's statement would not fill it.
    sql(database_url, "ALTER TABLE dbos.operation_outputs ADD COLUMN shard text NOT NULL DEFAULT 'x'")
    sql(database_url, "ALTER TABLE dbos.operation_outputs ALTER COLUMN shard DROP DEFAULT")
    app2 = make_app()
    with caplog.at_level("WARNING", logger="durapipe"), app2:
        assert app2.step_log() is None
    assert "required ['shard']" in caplog.text and "written by DBOS.run_step" in caplog.text


def test_a_fresh_execution_spends_one_statement_per_step_and_a_resume_checks_its_history(
        make_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch) -> None:
    """Lean path: above what the history held when the execution began, a step is only
    recorded (the record statement carries the cancel and ownership checks); a resume
    checks every step it replays and runs none of them again."""
    checks: list[str] = []
    writes: list[str] = []
    calls: list[str] = []
    lean_check, lean_write = StepLog.check, StepLog.write

    def check(self: StepLog, step: Any, name: str) -> Any:
        checks.append(name.split(":")[1])
        return lean_check(self, step, name)

    def write(self: StepLog, step: Any, name: str, *args: Any, **kwargs: Any) -> None:
        writes.append(name.split(":")[1])
        lean_write(self, step, name, *args, **kwargs)

    monkeypatch.setattr(StepLog, "check", check)
    monkeypatch.setattr(StepLog, "write", write)
    started, release = threading.Event(), threading.Event()

    def step(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def f(s: dict[str, Any]) -> dict[str, Any]:
            calls.append(name)
            if name == "hold":
                started.set()
                release.wait(30)
            return {name: len(calls)}
        f.__name__ = name
        return f

    names = ["s0", "s1", "s2", "s3", "hold", "t0", "t1"]
    app = make_app(steps="lean")
    p = app.pipeline("p", fn(step("s0")) >> fn(step("s1")) >> fn(step("s2")) >> fn(step("s3"))
                     >> fn(step("hold")) >> fn(step("t0")) >> fn(step("t1")))
    with app:
        handle = p.start({}, run_id="one-statement")
        assert started.wait(30)
        # Four steps recorded, one check: the first step's, which learns the history's end.
        assert writes == ["s0", "s1", "s2", "s3"] and checks == ["s0"]
        DBOS.cancel_workflow("one-statement")
        release.set()
        wait_for(lambda: handle.status() is RunStatus.CANCELLED, what="cancelled")
        checks.clear()
        writes.clear()
        DBOS.resume_workflow("one-statement")
        state = app.get_run("one-statement").result(timeout=30).state
    assert sorted(state) == sorted(names)
    # The resume checked the four recorded steps (and replayed them); hold's record was
    # refused at the cancel, so it ran again and was recorded with what followed, unchecked.
    assert checks == ["s0", "s1", "s2", "s3"] and writes == ["hold", "t0", "t1"]
    assert calls == ["s0", "s1", "s2", "s3", "hold", "hold", "t0", "t1"]


def test_a_step_of_an_execution_that_lost_the_workflow_is_not_recorded(
        make_app: Callable[..., App], database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ownership is checked by the record statement itself: a step that finishes after
    another execution took the workflow over (here its owner token changes while the step
    runs, as a recovery elsewhere changes it) records nothing, and nothing after it runs
    in this execution."""
    refused: list[str] = []
    lean_write = StepLog.write

    def write(self: StepLog, step: Any, name: str, *args: Any, **kwargs: Any) -> None:
        try:
            lean_write(self, step, name, *args, **kwargs)
        except BaseException as exc:  # DBOS's conflict error is not an Exception
            refused.append(f"{name}: {type(exc).__name__}")
            raise

    monkeypatch.setattr(StepLog, "write", write)
    calls: list[str] = []

    def taken_over(s: dict[str, Any]) -> dict[str, Any]:
        calls.append("taken_over")
        sql(database_url, "UPDATE dbos.workflow_status SET owner_xid = 'another-execution' "
                          "WHERE workflow_uuid = 'taken'")
        return {"b": 2}

    def after(s: dict[str, Any]) -> dict[str, Any]:
        calls.append("after")
        return {"c": 3}

    # No event stream: the record statement is the first one after the takeover.
    app = make_app(steps="lean", events=False)
    p = app.pipeline("p", fn(lambda s: {"a": 1}, name="first") >> fn(taken_over) >> fn(after))
    with app:
        p.start({}, run_id="taken")
        wait_for(lambda: bool(refused), what="the step's record to be refused")
        assert refused == ["0.1:taken_over: DBOSWorkflowConflictIDError"]
        assert [r[0] for r in sql(database_url, "SELECT function_name FROM dbos.operation_outputs "
                                                "WHERE workflow_uuid = 'taken' ORDER BY function_id")] \
            == ["0.0:first"]
        assert calls == ["taken_over"]
        DBOS.cancel_workflow("taken")  # the made-up owner never finishes it
