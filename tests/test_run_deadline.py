"""A run deadline (`start(..., timeout=)`, `run(..., timeout=)`) is durable and ends the whole
run: past it the run, its child workflows and its background tasks are cancelled, the step
in flight never runs the code after its await, and the result raises RunTimeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from dbutil import sql
from durapipe import App, DurapipeError, RunTimeout, dispatch, fn, join

S = dict[str, Any]


def test_a_run_past_its_deadline_is_cancelled_with_its_tasks(
    make_app: Callable[..., App], database_url: str
) -> None:
    notes: list[str] = []

    def slow(name: str) -> Any:
        async def body(state: S) -> S:
            notes.append(f"{name}-start")
            await asyncio.sleep(4)
            notes.append(f"{name}-end")
            return {name: True}
        body.__name__ = name
        return fn(body)

    app = make_app()
    p = app.pipeline("p", dispatch(slow("bg"), names=["bg"]) >> slow("main") >> join("bg"))
    with app:
        started = time.monotonic()
        with pytest.raises(RunTimeout) as info:
            p.run({}, run_id="d1", timeout=1.0)
        elapsed = time.monotonic() - started
        assert isinstance(info.value, TimeoutError) and info.value.run_id == "d1"
        assert "ran past its deadline" in str(info.value)
        time.sleep(max(0.0, 4.5 - elapsed))  # past the end of both steps' sleep
    assert elapsed < 3.5, elapsed  # ended near its deadline, not after the 4 s steps
    assert sorted(notes) == ["bg-start", "main-start"], notes  # no code after an await ran
    statuses = dict(sql(database_url, "SELECT workflow_uuid, status FROM dbos.workflow_status "
                                      "WHERE workflow_uuid LIKE 'd1%'"))
    assert set(statuses.values()) == {"CANCELLED"} and len(statuses) == 2, statuses


def test_a_deadline_must_be_a_positive_number(make_app: Callable[..., App]) -> None:
    app = make_app()
    p = app.pipeline("p", fn(lambda s: {"x": 1}, name="x"))
    with app:
        for bad in (0, -1, "5", True):
            with pytest.raises(DurapipeError, match="must be a number of seconds > 0"):
                p.start({}, timeout=bad)  # type: ignore[arg-type]
