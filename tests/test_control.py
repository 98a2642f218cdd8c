"""Fallback, loops, routing, race, timeouts, map and sleep, end to end on Postgres."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from dbutil import sql
from durapipe import (
    Agent,
    App,
    BuildError,
    FakeModel,
    NodeFailed,
    NodeTimeout,
    RunStatus,
    StateError,
    fn,
    map_over,
    race,
    route,
    sleep,
    transform,
    until,
)
from durapipe.ir import Loop

S = dict[str, Any]


def steps(url: str, run_id: str) -> list[tuple[str, str]]:
    """(workflow id, step name) of a run and its child workflows, in order."""
    return [(r[0], r[1]) for r in sql(
        url, "SELECT workflow_uuid, function_name FROM dbos.operation_outputs "
             "WHERE workflow_uuid = %s OR workflow_uuid LIKE %s ORDER BY workflow_uuid, function_id",
        run_id, run_id + "/%")]


def status_of(url: str, workflow_id: str) -> str:
    return str(sql(url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s",
                   workflow_id)[0][0])


def failing(msg: str, name: str) -> Callable[[S], S]:
    def f(state: S) -> S:
        raise ValueError(msg)
    f.__name__ = name
    return f


# -- fallback ---------------------------------------------------------------------------

def test_fallback_first_success_wins_and_failed_writes_do_not_leak(make_app: Callable[..., App]) -> None:
    calls: list[str] = []

    def first(state: S) -> S:
        calls.append("first")
        state["items"].append("leaked")   # an in-place edit of a failing attempt
        return {"partial": 1}

    def boom(state: S) -> S:
        calls.append("boom")
        raise RuntimeError("primary down")

    def backup(state: S) -> S:
        calls.append("backup")
        return {"answer": "from backup", "seen": list(state["items"]), "had_partial": "partial" in state}

    app = make_app()
    p = app.pipeline("p", (fn(first) >> fn(boom)) // fn(backup) // fn(failing("never", "third")))
    with app:
        state = p.run({"items": []}).state
    assert state == {"items": [], "answer": "from backup", "seen": [], "had_partial": False}
    assert calls == ["first", "boom", "backup"]


def test_fallback_all_fail_raises_the_last_error_naming_the_others(make_app: Callable[..., App]) -> None:
    app = make_app()
    p = app.pipeline("p", fn(failing("a broke", "a")) // fn(failing("b broke", "b")))
    with app, pytest.raises(NodeFailed) as e:
        p.run({})
    assert "b broke" in str(e.value) and "earlier: 0.0:a" in str(e.value) and "a broke" in str(e.value)
    assert e.value.node == "0.1:b"
    assert len(e.value.attempts) == 2


# -- loops ------------------------------------------------------------------------------

def test_loop_fixed_times_gives_each_pass_its_own_step(make_app: Callable[..., App], database_url: str) -> None:
    app = make_app()
    p = app.pipeline("p", fn(lambda s: {"n": s["n"] + 1}, name="inc") * 3)
    with app:
        assert p.run({"n": 0}, run_id="loop-1").state == {"n": 3}
    assert [s for _, s in steps(database_url, "loop-1")] == ["0.0#0:inc", "0.0#1:inc", "0.0#2:inc"]


def test_loop_until_stops_when_the_predicate_holds_or_at_max(make_app: Callable[..., App]) -> None:
    def enough(state: S) -> bool:
        return bool(state["n"] >= 4)

    body = fn(lambda s: {"n": s["n"] + 1, "passes": s.get("passes", 0) + 1}, name="inc")
    app = make_app()
    p = app.pipeline("p", body * until(enough, max=10))
    capped = app.pipeline("capped", body * until(lambda s: False, max=2))
    with app:
        assert p.run({"n": 1}).state == {"n": 4, "passes": 3}
        assert capped.run({"n": 0}).state == {"n": 2, "passes": 2}
    loop = p.node
    assert isinstance(loop, Loop) and loop.until is not None and loop.until.pred is enough
    assert loop.shape()["until"] == {"pred": enough.__qualname__, "max": 10}


def test_loop_predicate_that_raises_fails_clearly(make_app: Callable[..., App]) -> None:
    app = make_app()
    p = app.pipeline("p", fn(lambda s: {"n": 1}, name="one") * until(lambda s: s["missing"], max=3))
    with app, pytest.raises(NodeFailed, match=r"until\(\) predicate of loop at 0:loop pass 0 raised KeyError"):
        p.run({})


def test_loop_and_until_reject_bad_arguments() -> None:
    with pytest.raises(BuildError, match="whole number"):
        fn(lambda s: None) * 0
    with pytest.raises(BuildError, match="max must be an int >= 1"):
        until(lambda s: True, max=0)
    with pytest.raises(BuildError, match="predicate must be a function"):
        until("done")  # type: ignore[arg-type]


# -- route ------------------------------------------------------------------------------

def test_route_by_key_by_function_default_and_skip(make_app: Callable[..., App], database_url: str) -> None:
    model = FakeModel({"en": "hello", "fr": "bonjour", "other": "?"})
    app = make_app(model=model)
    branches = {"en": Agent("en").writes("greeting"), "fr": Agent("fr").writes("greeting")}
    by_key = app.pipeline("by_key", route("lang", branches, default=Agent("other").writes("greeting")))
    by_fn = app.pipeline("by_fn", route(lambda s: "fr" if s["n"] > 1 else "en", branches))
    skip = app.pipeline("skip", route("lang", branches) >> fn(lambda s: {"after": True}, name="after"))
    with app:
        assert by_key.run({"lang": "fr"}).state["greeting"] == "bonjour"
        assert by_key.run({"lang": "de"}).state["greeting"] == "?"
        assert by_fn.run({"n": 5}).state["greeting"] == "bonjour"
        assert skip.run({"lang": "de"}, run_id="skip-1").state == {"lang": "de", "after": True}
    recorded = sql(database_url, "SELECT function_name, output FROM dbos.operation_outputs "
                                 "WHERE workflow_uuid = 'skip-1' ORDER BY function_id")
    assert recorded[0][0] == "0.0:route"
    assert '"skipped":true' in recorded[0][1].replace(" ", "") and '"de"' in recorded[0][1]


def test_route_errors(make_app: Callable[..., App]) -> None:
    with pytest.raises(BuildError, match="non-empty dict"):
        route("k", {})
    with pytest.raises(BuildError, match="must be a str, number"):
        route("k", {("a",): fn(lambda s: None)})
    app = make_app()
    p = app.pipeline("p", route(lambda s: s["nope"], {"a": fn(lambda s: None, name="a")}))
    q = app.pipeline("q", fn(lambda s: None, name="z") >> route("lang", {"a": fn(lambda s: None, name="a")}))
    with app:
        with pytest.raises(NodeFailed, match=r"selector of route at 0:route raised KeyError"):
            p.run({})
        with pytest.raises(StateError, match="selects on state key 'lang', which is not in state"):
            q.run({})


# -- race -------------------------------------------------------------------------------

def test_race_first_success_wins_failures_do_not_and_losers_are_cancelled(
    make_app: Callable[..., App], database_url: str
) -> None:
    release = threading.Event()

    def fails_fast(state: S) -> S:
        raise RuntimeError("fast failure")

    async def wins(state: S) -> S:
        await asyncio.sleep(0.3)
        return {"winner": "b", "b_only": 1}

    def slow(state: S) -> S:
        release.wait(10)
        return {"winner": "c"}

    app = make_app()
    p = app.pipeline("p", race(fn(fails_fast), fn(wins) >> transform(lambda s: {"t": 1}),
                               fn(slow) >> fn(lambda s: {"after_slow": 1}, name="after")))
    with app:
        state = p.run({}, run_id="race-1").state
        release.set()
    assert state == {"winner": "b", "b_only": 1, "t": 1}
    children = dict(sql(database_url, "SELECT workflow_uuid, status FROM dbos.workflow_status "
                                      "WHERE parent_workflow_id = 'race-1'"))
    assert children == {"race-1/0.0:fails_fast": "ERROR", "race-1/0.1:seq": "SUCCESS",
                        "race-1/0.2:seq": "CANCELLED"}


def test_race_all_fail_lists_every_branch(make_app: Callable[..., App]) -> None:
    app = make_app()
    p = app.pipeline("p", race(fn(failing("x down", "x")), fn(failing("y down", "y"))))
    with app, pytest.raises(NodeFailed, match="every branch failed") as e:
        p.run({})
    assert "0.0:x: NodeFailed" in str(e.value) and "y down" in str(e.value)
    assert len(e.value.branches) == 2
    with pytest.raises(BuildError, match="at least two"):
        race(fn(lambda s: None))


# -- timeout ----------------------------------------------------------------------------

def test_timeout_cancels_a_slow_node_and_lets_a_fast_one_through(
    make_app: Callable[..., App], database_url: str
) -> None:
    async def slow(state: S) -> S:
        await asyncio.sleep(30)
        return {"slow": True}

    app = make_app()
    late = app.pipeline("late", fn(slow).timeout(0.5))
    quick = app.pipeline("quick", fn(lambda s: {"ok": 1}, name="ok").timeout(5))
    handled = app.pipeline("handled", fn(slow).timeout(0.3) // fn(lambda s: {"plan_b": 1}, name="b"))
    with app:
        with pytest.raises(NodeTimeout, match=r"node 0\.0:slow ran past its timeout of 0\.5 s") as e:
            late.run({}, run_id="late-1")
        assert e.value.seconds == 0.5
        assert quick.run({}).state == {"ok": 1}
        assert handled.run({}).state == {"plan_b": 1}
    assert status_of(database_url, "late-1/0.0:slow") == "CANCELLED"
    with pytest.raises(BuildError, match="seconds must be a number > 0"):
        fn(slow).timeout(0)


# -- map --------------------------------------------------------------------------------

def test_map_over_collects_results_in_input_order(make_app: Callable[..., App], database_url: str) -> None:
    async def shout(state: S) -> S:
        await asyncio.sleep(0.05 * (3 - len(state["word"])))   # later items finish first
        return {"loud": state["word"].upper()}

    model = FakeModel({"poet": lambda req: f"poem on {req.prompt}"})
    app = make_app(model=model)
    agent_map = app.pipeline("agents", map_over(
        "topics", Agent("poet").instruct("{item}").writes("poem"), "poems"))
    fn_map = app.pipeline("fns", map_over("words", fn(shout, writes=["loud"]), "louds", item_key="word"))
    multi = app.pipeline("multi", map_over(
        "xs", fn(lambda s: {"a": s["item"]}, name="a") >> fn(lambda s: {"b": s["a"] * 2}, name="b"), "out"))
    with app:
        assert agent_map.run({"topics": ["sea", "sky"]}).state["poems"] == ["poem on sea", "poem on sky"]
        assert fn_map.run({"words": ["a", "bb", "ccc"]}).state["louds"] == ["A", "BB", "CCC"]
        assert multi.run({"xs": [1, 2]}, run_id="multi-1").state["out"] == [{"a": 1, "b": 2}, {"a": 2, "b": 4}]
        assert fn_map.run({"words": []}).state["louds"] == []
    names = {s for _, s in steps(database_url, "multi-1")}
    assert {"0.0#0.0:a", "0.0#1.1:b"} <= names


def test_map_concurrency_bound_is_respected(make_app: Callable[..., App]) -> None:
    active: list[int] = []
    peak: list[int] = []
    lock = threading.Lock()

    async def work(state: S) -> S:
        with lock:
            active.append(1)
            peak.append(len(active))
        await asyncio.sleep(0.05)
        with lock:
            active.pop()
        return {"sq": state["item"] ** 2}

    app = make_app()
    p = app.pipeline("p", map_over("xs", fn(work, writes=["sq"]), "squares", concurrency=2))
    with app:
        assert p.run({"xs": list(range(7))}).state["squares"] == [i * i for i in range(7)]
    assert max(peak) == 2


def test_map_failure_names_the_item(make_app: Callable[..., App]) -> None:
    def check(state: S) -> S:
        if state["item"] == "bad":
            raise ValueError("cannot parse")
        return {"ok": state["item"]}

    app = make_app()
    p = app.pipeline("p", map_over("xs", fn(check, writes=["ok"]), "oks", concurrency=1))
    q = app.pipeline("q", map_over("xs", fn(check), "oks"))
    with app:
        with pytest.raises(NodeFailed, match=r"map 0:map: item 2 failed: .*cannot parse") as e:
            p.run({"xs": ["a", "b", "bad", "c"]})
        assert e.value.item == 2
        with pytest.raises(StateError, match="state key 'xs', which holds a str; it needs a list"):
            q.run({"xs": "abc"})
    with pytest.raises(BuildError, match="concurrency must be an int >= 1"):
        map_over("xs", fn(check), "oks", concurrency=0)


def test_bounded_map_finds_a_late_failure_after_earlier_items_left(
    make_app: Callable[..., App], database_url: str
) -> None:
    """A bounded map keeps only its running items in view (not every started one); an item
    that fails after many others finished is still the one found and named."""
    started: list[int] = []

    def first(state: S) -> S:
        started.append(state["item"])
        if state["item"] == 9:
            raise ValueError("item nine is bad")
        return {}

    app = make_app()
    body = fn(first) >> fn(lambda s: {"ok": s["item"]}, name="second", writes=["ok"])
    p = app.pipeline("p", map_over("xs", body, "oks", concurrency=2))
    with app:
        assert p.run({"xs": list(range(8))}).state["oks"] == [{"ok": i} for i in range(8)]
        started.clear()
        with pytest.raises(NodeFailed, match=r"map 0:map: item 9 failed: .*item nine is bad") as e:
            p.run({"xs": list(range(14))})
    assert e.value.item == 9
    assert set(started) >= set(range(10))


# -- sleep ------------------------------------------------------------------------------

def test_sleep_waits_durably(make_app: Callable[..., App], database_url: str) -> None:
    stamps: list[float] = []

    def stamp(state: S) -> S:
        stamps.append(time.time())
        return None  # type: ignore[return-value]

    app = make_app()
    p = app.pipeline("p", fn(stamp) >> sleep(0.4) >> fn(stamp, name="stamp2"))
    with app:
        assert p.run({}, run_id="sleep-1").status is RunStatus.SUCCESS
    assert stamps[1] - stamps[0] >= 0.4
    assert "DBOS.sleep" in [s for _, s in steps(database_url, "sleep-1")]
    with pytest.raises(BuildError, match="not a number of seconds > 0"):
        sleep(-1)
