"""Every foundation node kind and operator, end to end, on Postgres and on SQLite."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from durapipe import Agent, App, BuildError, FakeModel, NodeFailed, RunStatus, StateError, fn, transform
from durapipe.errors import AppStateError, ModelError, UnknownRun


def double(state: dict[str, Any]) -> dict[str, Any]:
    return {"n": state["n"] * 2}


async def add_one(state: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"n": state["n"] + 1}


def nothing(state: dict[str, Any]) -> None:
    return None


def test_sequence_of_fn_transform_and_agent(any_database_url: str) -> None:
    model = FakeModel({"writer": lambda req: f"post: {req.prompt}"})
    app = App("run-app", any_database_url, model=model)
    p = app.pipeline(
        "p",
        fn(double) >> add_one >> transform(lambda s: {"label": f"n={s['n']}"}) >> nothing
        >> Agent("writer").instruct("Write about {topic} ({label})").writes("draft"),
    )
    with app:
        result = p.run({"n": 3, "topic": "AI"})
    assert result.status is RunStatus.SUCCESS
    assert result.state == {"n": 7, "topic": "AI", "label": "n=7",
                            "draft": "post: Write about AI (n=7)"}
    assert model.calls[0].agent == "writer"


def test_parallel_branches_merge(any_database_url: str) -> None:
    model = FakeModel({"a": "A", "b": "B"})
    app = App("run-app", any_database_url, model=model)
    branch = fn(lambda s: {"c": 1}, name="c1", writes=["c"]) >> fn(lambda s: {"d": s["c"] + 1}, name="d1")
    p = app.pipeline("p", Agent("a") | Agent("b").writes("bee") | branch)
    with app:
        state = p.run({}).state
    assert state == {"a": "A", "bee": "B", "c": 1, "d": 2}


def test_parallel_undeclared_conflict_fails_at_run_time(database_url: str) -> None:
    app = App("run-app", database_url)
    p = app.pipeline("p", fn(lambda s: {"k": 1}, name="one") | fn(lambda s: {"k": 2}, name="two"))
    with app, pytest.raises(StateError, match="both wrote state key 'k'"):
        p.run({})


def test_start_is_idempotent_on_run_id(database_url: str) -> None:
    calls: list[int] = []

    def count(state: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        return {"done": True}

    app = App("run-app", database_url)
    p = app.pipeline("p", fn(count))
    with app:
        h1 = p.start({"x": 1}, run_id="post-42")
        assert h1.run_id == "post-42"
        assert h1.result(timeout=30).state == {"x": 1, "done": True}
        h2 = p.start({"x": 2}, run_id="post-42")
        assert h2.result().state == {"x": 1, "done": True}
        assert app.get_run("post-42").status() is RunStatus.SUCCESS
    assert len(calls) == 1


def test_async_twins(database_url: str) -> None:
    app = App("run-app", database_url)
    p = app.pipeline("p", fn(double) >> add_one)

    async def main() -> None:
        async with app:
            r = await p.run_async({"n": 1})
            assert r.state["n"] == 3
            h = await p.start_async({"n": 5}, run_id="async-1")
            assert (await h.result_async(timeout=30)).state["n"] == 11
            again = await app.get_run_async("async-1")
            assert await again.status_async() is RunStatus.SUCCESS

    asyncio.run(main())


def test_failing_fn_retries_then_fails_with_node_failed(database_url: str) -> None:
    attempts: list[int] = []

    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return {"ok": True}

    def broken(state: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("bad row 7")

    app = App("run-app", database_url)
    good = app.pipeline("good", fn(flaky, retries=2))
    bad = app.pipeline("bad", fn(double) >> fn(broken))
    with app:
        assert good.run({}).state == {"ok": True}
        assert len(attempts) == 3
        h = bad.start({"n": 1}, run_id="bad-1")
        with pytest.raises(NodeFailed, match=r"node 0\.1:broken failed: ValueError: bad row 7") as e:
            h.result()
        assert e.value.node == "0.1:broken"
        assert h.status() is RunStatus.ERROR
        # A handle from a lookup sees the same error, rebuilt from the database.
        with pytest.raises(NodeFailed, match="bad row 7"):
            app.get_run("bad-1").result()


def test_unserializable_state_is_a_clear_error(database_url: str) -> None:
    app = App("run-app", database_url)
    p = app.pipeline("p", fn(lambda s: {"when": object()}, name="stamp"))
    with app:
        with pytest.raises(StateError, match=r"0:stamp: state key 'when' holds a object"):
            p.run({})
        with pytest.raises(StateError, match="inputs.*'bad'.*set"):
            p.start({"bad": {1, 2}})


def test_missing_input_and_missing_template_key(database_url: str) -> None:
    app = App("run-app", database_url, model=FakeModel({"w": "x"}))
    inferred = app.pipeline("inferred", Agent("w").instruct("{topic}"))
    opaque = app.pipeline("opaque", fn(nothing) >> Agent("w").instruct("About {topic}"))
    with app:
        with pytest.raises(StateError, match="needs input 'topic'"):
            inferred.start({})
        with pytest.raises(StateError, match=r"agent 0\.1:w: the instruction needs state key 'topic'"):
            opaque.run({})


def test_app_lifecycle_errors(tmp_path: Path) -> None:
    app = App("life-app", f"sqlite:///{tmp_path}/x.sqlite")
    p = app.pipeline("p", fn(nothing))
    with pytest.raises(AppStateError, match="not launched"):
        p.start({})
    with app:
        with pytest.raises(AppStateError, match="register pipeline 'late' before"):
            app.pipeline("late", fn(nothing))
        with pytest.raises(UnknownRun, match="no run with id 'missing'"):
            app.get_run("missing")
    with pytest.raises(BuildError, match="another shape"):
        app.pipeline("p", fn(double))


def test_model_errors_name_the_agent(database_url: str) -> None:
    app = App("run-app", database_url)
    p = app.pipeline("p", Agent("writer", "no-such-model"))
    with app, pytest.raises(ModelError, match="agent 'writer': no model client is known for 'no-such-model'"):
        p.run({})


def test_default_database_is_an_embedded_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DURAPIPE_DATABASE_URL", raising=False)
    app = App("first-run")
    assert app.database_url == "sqlite:///first_run.sqlite"
    p = app.pipeline("p", fn(double))
    with app:
        assert p.run({"n": 2}).state == {"n": 4}
    assert (tmp_path / "first_run.sqlite").exists()
