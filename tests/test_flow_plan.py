"""The planner: chosen steps, stages, printing, every PlanError, and build-time checks."""

from __future__ import annotations

from typing import Any

import pytest

from durapipe import App, BuildError, Flow, PlanError, Step, fn
from durapipe.errors import StateError


def noop(state: dict[str, Any]) -> None:
    return None


def onboarding() -> Flow:
    return Flow(
        goals=["onboarding_complete"],
        steps=[
            Step("generate-documents", noop, needs=["customer_id"], outputs=["document_url"]),
            Step("setup-account", noop, needs=["customer_id", "email"], outputs=["account_id"]),
            Step("send-welcome-email", noop, needs=["email", "customer_name"], outputs=["email_sent"]),
            Step("complete-onboarding", noop, needs=["document_url", "account_id", "email_sent"],
                 outputs=["onboarding_complete"]),
            Step("upsell-offer", noop, needs=["account_id"], outputs=["offer"]),
        ],
    )


INPUTS = ["customer_id", "email", "customer_name"]


def test_plan_chooses_only_what_the_goals_need() -> None:
    plan = onboarding().plan(inputs=INPUTS)
    assert [s.name for s in plan.steps] == [
        "generate-documents", "setup-account", "send-welcome-email", "complete-onboarding"]
    assert plan.stages == (("generate-documents", "setup-account", "send-welcome-email"),
                           ("complete-onboarding",))
    assert plan.step("complete-onboarding").after == (
        "generate-documents", "setup-account", "send-welcome-email")
    assert plan.skipped == ("upsell-offer",)
    assert plan.reads == frozenset(INPUTS)
    assert plan.writes == {"document_url", "account_id", "email_sent", "onboarding_complete"}


def test_goals_may_name_steps_and_inputs_replace_producers() -> None:
    flow = Flow(goals=["upsell-offer"], steps=onboarding().steps)
    assert [s.name for s in flow.plan(inputs=INPUTS).steps] == ["setup-account", "upsell-offer"]
    # A key given as input is not produced again: nothing upstream of it runs.
    plan = onboarding().plan(inputs=["document_url", "account_id", "email_sent"])
    assert [s.name for s in plan.steps] == ["complete-onboarding"]
    assert plan.stages == (("complete-onboarding",),)


def test_plan_prints_as_table_and_mermaid() -> None:
    plan = onboarding().plan(inputs=INPUTS)
    table = str(plan)
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "step", "needs", "outputs", "after"]
    assert lines[2].split()[:2] == ["0", "generate-documents"]
    assert "complete-onboarding" in lines[5] and lines[5].startswith("1")
    assert "not needed: upsell-offer" in table
    graph = plan.mermaid()
    assert graph.startswith("flowchart LR")
    assert '    s3["complete-onboarding"]' in graph
    assert "    s0 -- document_url --> s3" in graph
    assert "    in_email -- email --> s2" in graph
    assert "s4" not in graph  # upsell-offer is not in the plan
    assert "class s3 goal" in graph


def test_missing_need_names_step_and_key() -> None:
    with pytest.raises(PlanError, match=r"step 'send-welcome-email' needs 'customer_name', which no "
                                        r"step produces and which is not a flow input") as e:
        onboarding().plan(inputs=["customer_id", "email"])
    assert (e.value.step, e.value.key) == ("send-welcome-email", "customer_name")
    assert isinstance(e.value, BuildError)


def test_two_producers_of_one_output() -> None:
    with pytest.raises(PlanError, match=r"steps 'a' and 'b' both produce 'x'") as e:
        Flow(goals=["x"], steps=[Step("a", noop, outputs=["x"]), Step("b", noop, outputs=["x"])])
    assert e.value.steps == ["a", "b"] and e.value.key == "x"


def test_cycle_names_steps_and_keys() -> None:
    flow = Flow(goals=["z"], steps=[
        Step("a", noop, needs=["y"], outputs=["x"]),
        Step("b", noop, needs=["x"], outputs=["y"]),
        Step("c", noop, needs=["x"], outputs=["z"]),
    ])
    with pytest.raises(PlanError, match=r"cycle a -> b -> a \(a needs 'y' from b; b needs 'x' from a\)") as e:
        flow.plan(inputs=[])
    assert e.value.steps == ["a", "b", "a"] and e.value.keys == ["y", "x"]
    # An input breaks the cycle.
    assert [s.name for s in flow.plan(inputs=["y"]).steps] == ["a", "c"]


def test_unknown_goal_and_bad_declarations() -> None:
    with pytest.raises(PlanError, match=r"unknown goal 'nope'.*steps: \['a'\]; outputs: \['x'\]"):
        Flow(goals=["nope"], steps=[Step("a", noop, outputs=["x"])])
    with pytest.raises(PlanError, match="two steps are named 'a'"):
        Flow(goals=["x"], steps=[Step("a", noop, outputs=["x"]), Step("a", noop, outputs=["y"])])
    with pytest.raises(BuildError, match=r"step 'a': declare what it produces"):
        Step("a", noop)
    with pytest.raises(BuildError, match="retries must be an int >= 0"):
        Step("a", noop, outputs=["x"], retries=-1)
    with pytest.raises(BuildError, match="is not a Step"):
        Flow(goals=["x"], steps=[fn(noop)])  # type: ignore[list-item]


def test_flow_is_a_node_with_stable_paths_and_retries_on_the_step() -> None:
    flow = onboarding()
    assert flow == onboarding() and flow.digest() == onboarding().digest()
    paths = dict(flow.walk())
    assert paths["0.3"].label == "complete-onboarding" and paths["0.3.0"].label == "noop"
    step = Step("s", fn(noop), outputs=["x"], retries=3)
    assert step.node.max_retries == 3  # type: ignore[attr-defined]
    seq = fn(noop, writes=["customer_id", "email", "customer_name"]) >> flow >> noop
    assert seq.nodes[1] is flow


def test_registration_checks_the_plan_against_upstream() -> None:
    app = App("plan-app", "sqlite:///unused.sqlite")
    # Declared inputs: the missing need is a build error naming the flow's path.
    with pytest.raises(PlanError, match=r"flow 0: step 'send-welcome-email' needs 'customer_name'"):
        app.pipeline("a", onboarding(), inputs=["customer_id", "email"])
    # Upstream writes count as flow inputs; downstream may read the flow's outputs.
    ok = app.pipeline("b", fn(noop, writes=["customer_name"]) >> onboarding()
                      >> fn(noop, reads=["onboarding_complete", "account_id"]),
                      inputs=["customer_id", "email"])
    assert ok.name == "b"
    # ...but not the output of a step the plan does not choose.
    with pytest.raises(BuildError, match=r"node 0\.1:noop reads state key 'offer'"):
        app.pipeline("c", onboarding() >> fn(noop, reads=["offer"]), inputs=INPUTS)
    # Inferred inputs: the needs no step produces become the pipeline's inputs.
    assert app.pipeline("d", onboarding())._reg.inputs == frozenset(INPUTS)
    # A step's inner node is checked against what is in state when it starts.
    inner = Flow(goals=["y"], steps=[
        Step("a", noop, needs=["x"], outputs=["w"]),
        Step("b", fn(noop, reads=["x", "w", "v"]), needs=["w"], outputs=["y"]),
    ])
    with pytest.raises(BuildError, match=r"node 0\.1\.0:noop reads state key 'v'"):
        app.pipeline("e", inner, inputs=["x"])
    # Opaque upstream: the plan is made at run time instead.
    assert app.pipeline("f", noop >> onboarding(), inputs=[]).name == "f"


def test_opaque_upstream_defers_the_plan_to_run_time(database_url: str) -> None:
    app = App("plan-app", database_url)
    p = app.pipeline("p", noop >> onboarding(), inputs=["customer_id"])
    with app, pytest.raises(PlanError, match=r"flow 0\.1: step 'setup-account' needs 'email'"):
        p.run({"customer_id": "c1"})


def test_missing_declared_output_and_inferred_input_errors(database_url: str) -> None:
    app = App("plan-app", database_url)
    flow = Flow(goals=["b"], steps=[
        Step("make-a", lambda s: {"wrong": 1}, needs=["x"], outputs=["a"]),
        Step("make-b", lambda s: {"b": 2}, needs=["a"], outputs=["b"]),
    ])
    p = app.pipeline("p", flow)
    with app:
        with pytest.raises(StateError, match="needs input 'x'"):
            p.start({})
        with pytest.raises(StateError, match=r"step 'make-a' \(0\.0\) finished without writing its "
                                             r"declared output 'a' \(it wrote: \['wrong'\]\)") as e:
            p.run({"x": 1})
    assert (e.value.step, e.value.key) == ("make-a", "a")
