"""Cancelling a run stops its running work now: an async step in flight never runs the code
after its await, and its child workflows and background tasks are cancelled with it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from dbutil import sql, wait_for
from durapipe import App, dispatch, fn, join, race
from durapipe.engine.admin import Admin
from durapipe.errors import RunCancelled

S = dict[str, Any]
SLOW = 3.0


def sleeper(name: str, notes: list[str]) -> Any:
    async def body(state: S) -> S:
        notes.append(f"{name}-start")
        await asyncio.sleep(SLOW)
        notes.append(f"{name}-end")  # must never run once the run is cancelled
        return {name: True}
    body.__name__ = name
    return fn(body)


def statuses(url: str, run_id: str) -> dict[str, str]:
    return dict(sql(url, "SELECT workflow_uuid, status FROM dbos.workflow_status "
                         "WHERE workflow_uuid = %s OR workflow_uuid LIKE %s", run_id, f"{run_id}/%"))


@pytest.mark.parametrize("how", ["handle", "admin"])
def test_cancel_reaches_the_async_step_the_children_and_the_background_tasks(
    make_app: Callable[..., App], database_url: str, how: str
) -> None:
    notes: list[str] = []
    app = make_app()
    p = app.pipeline("p", dispatch(sleeper("bg", notes), names=["bg"])
                     >> race(sleeper("ra", notes), sleeper("rb", notes)))
    q = app.pipeline("q", fn(lambda s: {"x": 1}, name="first") >> sleeper("main", notes))
    with app:
        handle, other = p.start({}, run_id="c1"), q.start({}, run_id="c2")
        wait_for(lambda: {"bg-start", "ra-start", "rb-start", "main-start"} <= set(notes),
                 what="every step in flight")
        started = time.monotonic()
        if how == "handle":
            handle.cancel()
            other.cancel()
        else:
            with Admin(database_url) as admin:  # another process's view: the watcher acts
                admin.cancel("c1")
                admin.cancel("c2")
        with pytest.raises(RunCancelled):
            handle.result(timeout=30)
        with pytest.raises(RunCancelled):
            other.result(timeout=30)
        stopped = time.monotonic() - started
        time.sleep(SLOW + 0.5)  # past the end of every step's sleep
    assert not [n for n in notes if n.endswith("-end")], notes
    assert stopped < SLOW, stopped  # stopped at the await, not at the step's end
    for run_id in ("c1", "c2"):
        found = statuses(database_url, run_id)
        assert set(found.values()) == {"CANCELLED"}, found
    assert len(statuses(database_url, "c1")) == 4  # the run, the task, two race branches
    # the cancelled steps recorded nothing; the step before them stays recorded
    rows = sql(database_url, "SELECT function_name FROM dbos.operation_outputs "
                             "WHERE function_name LIKE '0%:%'")
    assert sorted(n for (n,) in rows) == ["0.0:first"]


def test_a_sync_step_in_flight_finishes_but_nothing_after_it_starts(
    make_app: Callable[..., App], database_url: str
) -> None:
    notes: list[str] = []

    def sync_slow(state: S) -> S:
        notes.append("sync-start")
        time.sleep(1.0)
        notes.append("sync-end")
        return {"s": 1}

    def after(state: S) -> S:
        notes.append("after")
        return {"a": 1}

    app = make_app()
    p = app.pipeline("p", fn(sync_slow) >> fn(after))
    with app:
        handle = p.start({}, run_id="s1")
        wait_for(lambda: "sync-start" in notes, what="the sync step")
        handle.cancel()
        with pytest.raises(RunCancelled):
            handle.result(timeout=30)
        wait_for(lambda: "sync-end" in notes, what="the sync step to finish")
        time.sleep(0.5)
    assert notes == ["sync-start", "sync-end"]
    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 's1'") \
        == [("CANCELLED",)]


def test_cancel_async(make_app: Callable[..., App]) -> None:
    notes: list[str] = []
    app = make_app()
    p = app.pipeline("p", sleeper("main", notes))

    async def main() -> None:
        async with app:
            handle = await p.start_async({}, run_id="a1")
            while "main-start" not in notes:
                await asyncio.sleep(0.02)
            await handle.cancel_async()
            with pytest.raises(RunCancelled):
                await handle.result_async(timeout=30)
            await asyncio.sleep(SLOW + 0.5)

    asyncio.run(main())
    assert notes == ["main-start"]


def test_resume_after_a_cancel_resumes_the_children_the_cancel_took(
    make_app: Callable[..., App], database_url: str
) -> None:
    notes: list[str] = []

    def first(state: S) -> S:
        notes.append("first")
        return {"x": 1}

    app = make_app()
    p = app.pipeline("p", fn(first) >> dispatch(sleeper("bg", notes), names=["bg"])
                     >> race(sleeper("ra", notes), sleeper("rb", notes)) >> join())
    with app:
        handle = p.start({}, run_id="r1")
        wait_for(lambda: {"bg-start", "ra-start", "rb-start"} <= set(notes),
                 what="every step in flight")
        with Admin(database_url) as admin:
            admin.cancel("r1")
            with pytest.raises(RunCancelled):
                handle.result(timeout=30)
            assert set(statuses(database_url, "r1").values()) == {"CANCELLED"}
            admin.resume("r1")  # what `durapipe resume r1` does
        state = handle.result(timeout=60).state  # the handle from start() follows the resumed run
    assert state["bg"] is True and (state.get("ra") or state.get("rb"))
    assert notes.count("first") == 1  # finished before the cancel: not run again
    assert notes.count("bg-end") == 1
    assert statuses(database_url, "r1")["r1"] == "SUCCESS"
    assert statuses(database_url, "r1")["r1/0.1.0:bg"] == "SUCCESS"
