"""Race branches, best_of candidates, a timeout's body and a Flow's steps start child
workflows from a reference to one snapshot of a large state (or just the keys they read),
never a copy each; a run recorded while children still got copies resumes with copies at
the step numbers it recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from dbutil import bytes_written, sql, wait_for
from durapipe import Flow, Step, best_of, fn, race
from durapipe.engine import handoff
from durapipe.engine.handoff import Handoff

S = dict[str, Any]
DOC = "z" * 1_000_000
REF = "durapipe:state_ref"



def child_inputs(url: str, run_id: str) -> list[str]:
    return [r[0] for r in sql(url, "SELECT inputs FROM dbos.workflow_input WHERE workflow_uuid LIKE %s",
                              f"{run_id}/%")]


def size(state: S) -> S:
    return {"size": len(state["doc"])}


def title(state: S) -> S:
    return {"title": state["topic"].title()}


def halve(state: S) -> S:
    return {"half": state["size"] // 2}


def report(state: S) -> S:
    return {"report": f"{state['title']}: {state['size']}/{state['half']} {len(state['doc'])}"}


def pick(state: S) -> S:
    return {"pick": state["candidate"] * len(state["doc"])}


def test_race_flow_best_of_and_timeout_write_one_copy_of_a_large_state(
        make_app: Any, database_url: str) -> None:
    def slow(state: S) -> S:
        return {"loser": len(state["doc"])}

    async def quick(state: S) -> S:
        return {"winner": len(state["doc"])}

    async def never(state: S) -> S:
        await asyncio.sleep(3600)
        return {}

    app = make_app("handoff-children")
    # Multi-step branches that read the whole state (no reads=): a reference each.
    racing = app.pipeline("racing", race(fn(quick) >> fn(size), fn(never) >> fn(slow),
                                         fn(never, name="never2") >> fn(slow, name="slow2")))
    flow = app.pipeline("flow", Flow(goals=["report"], steps=[
        Step("measure", fn(size), needs=["doc"], outputs=["size"]),
        Step("name", fn(title), needs=["topic"], outputs=["title"]),
        Step("half", fn(halve), needs=["size"], outputs=["half"]),
        Step("report", fn(report), needs=["half", "title"], outputs=["report"]),
    ]))
    best = app.pipeline("best", best_of(3, fn(pick), score=lambda s: s["pick"]))
    # A timeout's body that declares what it reads gets only that.
    timed = app.pipeline("timed", fn(title, reads=["topic"]).timeout(60))
    with app:
        state = racing.run({"doc": DOC}, run_id="race").state
        assert state["winner"] == state["size"] == len(DOC) and "loser" not in state
        state = flow.run({"doc": DOC, "topic": "big doc"}, run_id="flow").state
        assert state["report"] == f"Big Doc: {len(DOC)}/{len(DOC) // 2} {len(DOC)}"
        assert best.run({"doc": DOC}, run_id="best").state["pick"] == 2 * len(DOC)
        assert timed.run({"doc": DOC, "topic": "t"}, run_id="timed").state["title"] == "T"
    for run_id in ("race", "flow", "best"):
        inputs = child_inputs(database_url, run_id)
        assert len(inputs) >= 3 and all(len(i) < 10_000 for i in inputs), (run_id, [len(i) for i in inputs])
        assert all(REF in i for i in inputs), run_id
        # The run's input, its output and one snapshot: 3 MB (a copy per child was 5-6 MB).
        wrote = bytes_written(database_url, run_id)
        assert wrote < 3_300_000, (run_id, wrote)
    # A Flow's later steps get the reference and the keys the flow wrote before them.
    half = sql(database_url, "SELECT inputs FROM dbos.workflow_input WHERE workflow_uuid LIKE 'flow/%:half'")
    assert REF in half[0][0] and '"size"' in half[0][0]
    assert [len(i) < 1000 and '"doc"' not in i for i in child_inputs(database_url, "timed")] == [True]


Released = False


async def hold(state: S) -> S:
    while not Released:
        await asyncio.sleep(0.05)
    return {"held": len(state["doc"])}


def test_a_race_recorded_with_copies_resumes_with_copies(
        make_app: Any, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race's children were started with copies (as before references) and the process
    stopped; the next process replays the race at the numbers it recorded and finishes."""
    global Released
    Released = False

    async def copies(self: Handoff, node: Any, extra: Mapping[str, Any] | None = None,
                     share: bool = True) -> S:
        return {**self.state, **(extra or {})}

    app = make_app("handoff-old")
    p = app.pipeline("p", race(fn(hold) >> fn(size), fn(hold, name="hold2") >> fn(size, name="size2"))
                     >> fn(title))
    monkeypatch.setattr(Handoff, "input", copies)
    with app:
        p.start({"doc": DOC, "topic": "old run"}, run_id="old")
        wait_for(lambda: len(child_inputs(database_url, "old")) == 2, what="both branches started")
    monkeypatch.undo()
    assert all(REF not in i and len(i) > len(DOC) for i in child_inputs(database_url, "old"))
    Released = True
    with app:
        state = app.get_run("old").result(timeout=60).state
    assert state["held"] == state["size"] == len(DOC) and state["title"] == "Old Run"
    # No snapshot step was put where the history had the first branch's start.
    assert sql(database_url, "SELECT count(*) FROM dbos.operation_outputs WHERE workflow_uuid = 'old' "
               "AND function_name LIKE %s", "%:state") == [(0,)]
    assert len(child_inputs(database_url, "old")) == 2
    assert handoff.SMALL < len(DOC)
