"""A token budget is exact at any concurrency: a budgeted run makes its model calls one at
a time, so a map of agents at its default concurrency, a map of child workflows and ``|``
branches all stop after exactly ``ceil(budget / tokens per call)`` calls; a run without a
budget still makes its calls at the same time."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dbutil import scratch_database
from durapipe import Agent, App, BudgetExceeded, map_over
from durapipe.engine import bounds
from durapipe.engine.budget import usage
from durapipe.models import FakeModel, ModelRequest

PER_CALL = 7  # "Write about a." (3 words) + "four words of output" (4 words)
BUDGET = 22


class Counting:
    """The fake model's answer: counts the calls, the items asked about, and the most calls
    in flight at once. With ``wait_for`` set, each call waits until that many are in flight
    (a barrier: a run that made its calls one at a time would never get there)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.in_flight = 0
        self.most = 0
        self.wait_for = 0

    async def __call__(self, request: ModelRequest) -> str:
        self.items.append(request.prompt.split()[-1].rstrip("."))
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            deadline = time.monotonic() + 20
            while self.most < self.wait_for and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            for _ in range(5):  # a window in which another call could start, if allowed
                await asyncio.sleep(0)
        finally:
            self.in_flight -= 1
        return "four words of output"

    def reset(self, wait_for: int = 0) -> None:
        self.items.clear()
        self.most = 0
        self.wait_for = wait_for


class Shared:
    def __init__(self, url: str) -> None:
        self.model = Counting()
        self.app = App("budget-exact", url, model=FakeModel({"w": self.model}))
        agent = Agent("w").instruct("Write about {item}.").writes("text")
        self.inline = self.app.pipeline("inline", map_over("items", agent, "texts"))
        self.children = self.app.pipeline("children", map_over("items", agent, "texts",
                                                              concurrency=6))
        a, b, c, d, e = (Agent("w").instruct(f"Write about {{{k}}}.").writes(f"t{k}")
                         for k in "abcde")
        self.branches = self.app.pipeline("branches", a | b | c | d)
        self.five = self.app.pipeline("five", a | b | c | d | e)


@pytest.fixture(scope="module")
def shared(pg_server_url: str) -> Iterator[Shared]:
    with scratch_database(pg_server_url) as url:
        s = Shared(url)
        with s.app:
            yield s


def _stopped(shared: Shared, pipeline: Any, inputs: dict[str, Any]) -> BudgetExceeded:
    shared.model.reset()
    handle = pipeline.start(inputs, max_tokens=BUDGET)
    with pytest.raises(BudgetExceeded) as info:
        handle.result(timeout=60)
    calls = math.ceil(BUDGET / PER_CALL)  # each made call saw usage < BUDGET before it
    assert len(shared.model.items) == calls == 4, shared.model.items
    assert shared.model.most == 1  # one call at a time
    assert usage(shared.app, handle.run_id) == calls * PER_CALL
    err = info.value
    assert err.used == calls * PER_CALL == 28 and err.max_tokens == BUDGET
    assert f"used {calls * PER_CALL} tokens of its budget max_tokens={BUDGET}" in str(err)
    return err


@pytest.mark.parametrize("which", ["inline", "children"])
def test_a_map_of_six_agents_stops_after_exactly_four_calls(shared: Shared, which: str) -> None:
    assert bounds.limit() >= 6  # the default concurrency runs all six items at once
    items = list("abcdef")
    for _ in range(2):  # the same count on every execution
        err = _stopped(shared, getattr(shared, which), {"items": items})
        found = re.search(r"agent 0\.0#(\d):w", str(err))
        assert found, str(err)
        # The named item is one whose call was not made.
        assert items[int(found[1])] not in shared.model.items


def test_parallel_agents_stop_after_exactly_four_calls(shared: Shared) -> None:
    err = _stopped(shared, shared.five, {k: k for k in "abcde"})
    found = re.search(r"agent 0\.(\d):w", str(err))
    assert found, str(err)
    assert "abcde"[int(found[1])] not in shared.model.items
    # Four branches within the budget all answer; the fifth would have needed more.
    shared.model.reset()
    out = shared.branches.run({k: k for k in "abcd"}, max_tokens=4 * PER_CALL)
    assert sorted(shared.model.items) == list("abcd") and out.state["td"]


@pytest.mark.parametrize("which", ["inline", "children", "branches"])
def test_a_run_without_a_budget_makes_its_calls_at_the_same_time(shared: Shared,
                                                                 which: str) -> None:
    shared.model.reset(wait_for=4)  # every call waits until four are in flight
    inputs: dict[str, Any] = {k: k for k in "abcd"} if which == "branches" else {
        "items": list("abcd")}
    getattr(shared, which).run(inputs)
    assert shared.model.most == 4 and sorted(shared.model.items) == list("abcd")
