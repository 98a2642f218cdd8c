"""Flows run on Postgres: each step starts as soon as its needs are in state, exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from dbutil import sql
from durapipe import Agent, App, FakeModel, Flow, NodeFailed, Step, fn

Fn = Callable[[dict[str, Any]], Any]


def timed(name: str, seconds: float, **writes: Any) -> Fn:
    """A step that sleeps, then writes ``writes`` plus its ``[start, end]`` under ``t:<name>``."""

    async def run(state: dict[str, Any]) -> dict[str, Any]:
        start = time.time()
        await asyncio.sleep(seconds)
        return {**writes, f"t:{name}": [start, time.time()]}

    run.__name__ = run.__qualname__ = name.replace("-", "_")
    return run


def span(state: dict[str, Any], name: str) -> tuple[float, float]:
    start, end = state[f"t:{name}"]
    return start, end


def test_onboarding_overlaps_independent_steps_and_skips_upsell(make_app: Callable[..., App],
                                                                 database_url: str) -> None:
    flow = Flow(
        goals=["onboarding_complete"],
        steps=[
            Step("generate-documents", timed("generate-documents", 0.6, document_url="u"),
                 needs=["customer_id"], outputs=["document_url"]),
            Step("setup-account", timed("setup-account", 0.3, account_id="a"),
                 needs=["customer_id", "email"], outputs=["account_id"]),
            Step("send-welcome-email", timed("send-welcome-email", 0.4, email_sent=True),
                 needs=["email", "customer_name"], outputs=["email_sent"]),
            Step("complete-onboarding", timed("complete-onboarding", 0, onboarding_complete=True),
                 needs=["document_url", "account_id", "email_sent"], outputs=["onboarding_complete"]),
            Step("upsell-offer", timed("upsell-offer", 0, offer="x"), needs=["account_id"],
                 outputs=["offer"]),
        ],
    )
    app = make_app()
    p = app.pipeline("onboard", flow, inputs=["customer_id", "email", "customer_name"])
    with app:
        state = p.run({"customer_id": "c1", "email": "e", "customer_name": "n"}, run_id="onb-1").state
    assert state["onboarding_complete"] is True
    three = ["generate-documents", "setup-account", "send-welcome-email"]
    spans = {n: span(state, n) for n in three}
    # The three independent steps overlap: each starts before any of them ends.
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values())
    # complete-onboarding starts after the last of them ends.
    assert span(state, "complete-onboarding")[0] >= max(e for _, e in spans.values())
    assert "offer" not in state and "t:upsell-offer" not in state
    children = {r[0] for r in sql(database_url, "SELECT workflow_uuid FROM dbos.workflow_status "
                                                "WHERE parent_workflow_id = 'onb-1'")}
    assert children == {"onb-1/0.0:generate-documents", "onb-1/0.1:setup-account",
                        "onb-1/0.2:send-welcome-email", "onb-1/0.3:complete-onboarding"}


def test_early_inputs_do_not_wait_for_an_unrelated_slow_step(make_app: Callable[..., App]) -> None:
    flow = Flow(goals=["done"], steps=[
        Step("slow", timed("slow", 1.0, x=1), needs=["seed"], outputs=["x"]),
        Step("fast", timed("fast", 0.05, a=1), needs=["seed"], outputs=["a"]),
        Step("after-fast", timed("after-fast", 0.05, b=1), needs=["a"], outputs=["b"]),
        Step("again", timed("again", 0.05, c=1), needs=["b"], outputs=["c"]),
        Step("final", timed("final", 0, done=True), needs=["x", "c"], outputs=["done"]),
    ])
    app = make_app()
    p = app.pipeline("p", flow, inputs=["seed"])
    with app:
        state = p.run({"seed": 1}).state
    slow = span(state, "slow")
    # after-fast and again are stage 1 and 2 but run while stage 0's slow step still runs.
    assert span(state, "after-fast")[0] >= span(state, "fast")[1]
    assert span(state, "again")[0] >= span(state, "after-fast")[1]
    assert span(state, "again")[1] < slow[1]
    assert span(state, "final")[0] >= slow[1]


def test_diamond_in_a_sequence_with_agents_and_sub_pipelines(make_app: Callable[..., App]) -> None:
    seen: list[str] = []

    def top(state: dict[str, Any]) -> dict[str, Any]:
        seen.append("top")
        return {"base": state["topic"].upper()}

    def left(state: dict[str, Any]) -> dict[str, Any]:
        seen.append("left")
        return {"l": state["base"] + "-L"}

    def bottom(state: dict[str, Any]) -> dict[str, Any]:
        seen.append("bottom")
        return {"joined": f"{state['l']}+{state['r']}"}

    right = fn(lambda s: {"r0": s["base"] + "-R"}, name="r0") >> fn(lambda s: {"r": s["r0"] + "!"}, name="r1")
    diamond = Flow(goals=["joined"], steps=[
        Step("bottom", bottom, needs=["l", "r"], outputs=["joined"]),
        Step("left", left, needs=["base"], outputs=["l"]),
        Step("right", right, needs=["base"], outputs=["r"]),
        Step("top", top, needs=["topic"], outputs=["base"]),
    ])
    assert diamond.plan(inputs=["topic"]).stages == (("top",), ("left", "right"), ("bottom",))
    writer = Agent("writer").instruct("Topic?").writes("topic")
    notify = fn(lambda s: {"note": f"sent {s['joined']}"}, name="notify", reads=["joined"])
    app = make_app(model=FakeModel({"writer": "ai"}))
    p = app.pipeline("p", writer >> diamond >> notify, inputs=[])
    with app:
        state = p.run({}).state
    assert state["note"] == "sent AI-L+AI-R!"
    assert seen[0] == "top" and seen[-1] == "bottom" and sorted(seen) == ["bottom", "left", "top"]


def test_failing_step_fails_the_flow_with_its_name_and_retries_apply(make_app: Callable[..., App],
                                                                      database_url: str) -> None:
    attempts: list[int] = []

    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return {"y": len(attempts)}

    composite_attempts: list[int] = []

    def flaky_inner(state: dict[str, Any]) -> dict[str, Any]:
        composite_attempts.append(1)
        if len(composite_attempts) < 2:
            raise ConnectionError("once")
        return {"w": 1}

    def broken(state: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("no account for c1")

    ok = Flow(goals=["y", "w"], steps=[
        Step("flaky", flaky, needs=["x"], outputs=["y"], retries=2),
        Step("composite", fn(lambda s: {"v": 1}, name="pre") >> flaky_inner, needs=["x"],
             outputs=["w"], retries=1),
    ])
    bad = Flow(goals=["z"], steps=[
        Step("slow", timed("slow", 30, q=1), needs=["x"], outputs=["q"]),
        Step("setup-account", broken, needs=["x"], outputs=["y"]),
        Step("never", timed("never", 0, z=1), needs=["y", "q"], outputs=["z"]),
    ])
    app = make_app()
    good_p = app.pipeline("good", ok, inputs=["x"])
    bad_p = app.pipeline("bad", bad, inputs=["x"])
    with app:
        assert good_p.run({"x": 1}).state["y"] == 3
        assert len(composite_attempts) == 2
        with pytest.raises(NodeFailed, match=r"step 'setup-account' \(0\.1\) failed: node 0\.1\.0:broken "
                                             r"failed: ValueError: no account for c1") as e:
            bad_p.run({"x": 1}, run_id="bad-1")
    assert e.value.step == "setup-account"
    # The step still in flight was cancelled with the flow.
    rows = sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'bad-1/0.0:slow'")
    assert rows == [("CANCELLED",)]


def test_a_flow_can_be_dispatched_and_run_in_parallel(make_app: Callable[..., App]) -> None:
    def small_flow(tag: str) -> Flow:
        return Flow(goals=[f"{tag}_done"], steps=[
            Step(f"{tag}-a", fn(lambda s, t=tag: {f"{t}_a": s["x"] + 1}, name=f"{tag}_a"),
                 needs=["x"], outputs=[f"{tag}_a"]),
            Step(f"{tag}-b", fn(lambda s, t=tag: {f"{t}_done": s[f"{t}_a"] * 10}, name=f"{tag}_b"),
                 needs=[f"{tag}_a"], outputs=[f"{tag}_done"]),
        ])

    from durapipe import dispatch, join

    app = make_app()
    p = app.pipeline("p", dispatch(small_flow("bg"), names=["bg"])
                     >> (small_flow("left") | fn(lambda s: {"right": 1}, name="right"))
                     >> join("bg"), inputs=["x"])
    with app:
        state = p.run({"x": 1}).state
    assert (state["bg_done"], state["left_done"], state["right"]) == (20, 20, 1)
