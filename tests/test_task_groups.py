"""`a | b`, `map_over` and `Flow` are task groups: the first failure cancels the siblings
still running (their code after an await never runs) and the node fails at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from dbutil import sql
from durapipe import App, Flow, Node, Step, fn, map_over
from durapipe.errors import NodeFailed

S = dict[str, Any]
SLOW = 4.0


class Notes:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def fail_fast(self, name: str = "fail_fast") -> Callable[[S], Any]:
        async def body(state: S) -> S:
            self.seen.append(f"{name}-start")
            await asyncio.sleep(0.2)
            raise ValueError("no luck")
        body.__name__ = name
        return body

    def slow(self, name: str = "slow", **out: Any) -> Callable[[S], Any]:
        async def body(state: S) -> S:
            self.seen.append(f"{name}-start")
            await asyncio.sleep(SLOW)
            self.seen.append(f"{name}-end")  # never, once a sibling failed
            return out or {name: True}
        body.__name__ = name
        return body


def fails_fast_and_cancels(app: App, pipeline: Any, notes: Notes) -> NodeFailed:
    with app:
        started = time.monotonic()
        with pytest.raises(NodeFailed) as info:
            pipeline.run({"items": ["bad", "slow-1", "slow-2"]}, run_id="g1")
        elapsed = time.monotonic() - started
        time.sleep(SLOW + 0.5)  # past the end of every slow sleep
    assert elapsed < SLOW - 1, elapsed  # failed at once, not after the slowest sibling
    assert not [n for n in notes.seen if n.endswith("-end")], notes.seen
    assert "no luck" in str(info.value) and "cancelled the running siblings" in str(info.value)
    return info.value


def child_statuses(url: str) -> list[str]:
    return [s for (s,) in sql(url, "SELECT status FROM dbos.workflow_status "
                                   "WHERE workflow_uuid LIKE 'g1/%' ORDER BY workflow_uuid")]


@pytest.mark.parametrize("kind", ["inline", "child"])
def test_parallel_fails_at_the_first_failure_and_cancels_the_other_branch(
    make_app: Callable[..., App], database_url: str, kind: str
) -> None:
    notes = Notes()
    slow: Node = fn(notes.slow())
    if kind == "child":  # a branch that runs as a child workflow
        slow = fn(notes.slow()) // fn(notes.slow("never"))
    app = make_app()
    p = app.pipeline("p", fn(notes.fail_fast()) | slow)
    error = fails_fast_and_cancels(app, p, notes)
    assert error.data["cancelled"] == [f"0.1:{slow.label}"]
    assert notes.seen.count("slow-start") == 1
    if kind == "child":
        assert child_statuses(database_url) == ["CANCELLED"]


@pytest.mark.parametrize("kind", ["inline", "child"])
def test_map_over_fails_at_the_first_failed_item_and_cancels_the_others(
    make_app: Callable[..., App], database_url: str, kind: str
) -> None:
    notes = Notes()

    async def item(state: S) -> S:
        if state["item"] == "bad":
            return await notes.fail_fast()(state)  # type: ignore[no-any-return]
        return await notes.slow(state["item"])(state)  # type: ignore[no-any-return]

    body: Node = fn(item, writes=["r"])
    if kind == "child":  # a body of two steps runs each item as a child workflow
        body = fn(item) >> fn(lambda s: {"r": 1}, name="after")
    app = make_app()
    p = app.pipeline("p", map_over("items", body, "out"), inputs=["items"])
    error = fails_fast_and_cancels(app, p, notes)
    assert error.data["item"] == 0
    assert sorted(error.data["cancelled"]) == [f"0.0#1:{body.label}", f"0.0#2:{body.label}"]
    if kind == "child":
        assert child_statuses(database_url) == ["ERROR", "CANCELLED", "CANCELLED"]


def test_flow_fails_at_the_first_failed_step_and_cancels_the_running_ones(
    make_app: Callable[..., App], database_url: str
) -> None:
    notes = Notes()
    flow = Flow(goals=["done"], steps=[
        Step("check", notes.fail_fast("check"), needs=["items"], outputs=["checked"]),
        Step("fetch", notes.slow("fetch", fetched=True), needs=["items"], outputs=["fetched"]),
        Step("finish", lambda s: {"done": True}, needs=["checked", "fetched"], outputs=["done"]),
    ])
    app = make_app()
    p = app.pipeline("p", flow, inputs=["items"])
    error = fails_fast_and_cancels(app, p, notes)
    assert [c.split(":")[1] for c in error.data["cancelled"]] == ["fetch"]
    assert sorted(child_statuses(database_url)) == ["CANCELLED", "ERROR"]
