"""Random 20-step DAGs: the plan is exactly the goals' ancestors, and every chosen step runs
once, after all of its needs, having seen their values."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from durapipe import App, Flow, Step

N = 20
INPUTS = ("in0", "in1")
LOG: list[tuple[str, str, float, float]] = []  # (dag, step, start, end)


def make_step_fn(dag: str, name: str, needs: tuple[str, ...]) -> Callable[[dict[str, Any]], Any]:
    def run(state: dict[str, Any]) -> dict[str, Any]:
        start = time.time()
        value = f"{name}({','.join(str(state[k]) for k in needs)})"
        LOG.append((dag, name, start, time.time()))
        return {f"k{name[1:]}": value}

    return run


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[tuple[str, tuple[str, ...]]], list[str], list[int]]:
    """Steps ``s<i>`` producing ``k<i>`` from earlier keys or inputs, declared in random order."""
    steps = []
    for i in range(N):
        pool = list(INPUTS) + [f"k{j}" for j in range(i)]
        needs = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
        steps.append((f"s{i}", tuple(needs)))
    if draw(st.booleans()):
        # Every sink as a goal: all 20 steps are chosen.
        needed = {k for _, needs in steps for k in needs}
        goals = [f"k{i}" for i in range(N) if f"k{i}" not in needed]
    else:
        goals = draw(st.lists(st.sampled_from([f"k{i}" for i in range(N)] + [f"s{i}" for i in range(N)]),
                              min_size=1, max_size=3, unique=True))
    order = draw(st.permutations(list(range(N))))
    return steps, goals, order


def ancestors(steps: list[tuple[str, tuple[str, ...]]], goals: list[str]) -> set[str]:
    needs = dict(steps)
    todo = [g if g.startswith("s") else f"s{g[1:]}" for g in goals]
    out: set[str] = set()
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo.extend(f"s{k[1:]}" for k in needs[s] if k.startswith("k"))
    return out


def expected_value(steps: list[tuple[str, tuple[str, ...]]], key: str, inputs: dict[str, str]) -> str:
    if key in inputs:
        return inputs[key]
    name = f"s{key[1:]}"
    needs = dict(steps)[name]
    return f"{name}({','.join(expected_value(steps, k, inputs) for k in needs)})"


def test_random_dags_plan_and_run_correctly(make_app: Callable[..., App]) -> None:
    cases: list[tuple[Flow, list[tuple[str, tuple[str, ...]]], list[str], set[str]]] = []

    @settings(max_examples=10, deadline=None, database=None)
    @given(dags())
    def plan_case(case: tuple[list[tuple[str, tuple[str, ...]]], list[str], list[int]]) -> None:
        steps, goals, order = case
        dag = f"dag{len(cases)}"
        flow = Flow(goals=goals, steps=[
            Step(steps[i][0], make_step_fn(dag, steps[i][0], steps[i][1]), needs=steps[i][1],
                 outputs=[f"k{i}"])
            for i in order
        ])
        plan = flow.plan(inputs=INPUTS)
        chosen = ancestors(steps, goals)
        assert {s.name for s in plan.steps} == chosen
        position = {s.name: n for n, s in enumerate(plan.steps)}
        for s in plan.steps:
            for dep in s.after:
                assert position[dep] < position[s.name]
                assert plan.step(dep).stage < s.stage
        cases.append((flow, steps, goals, chosen))

    plan_case()
    app = make_app()
    pipelines = [app.pipeline(f"dag{n}", flow, inputs=list(INPUTS)) for n, (flow, *_) in enumerate(cases)]
    inputs = {"in0": "a", "in1": "b"}
    with app:
        handles = [p.start(inputs) for p in pipelines]
        results = [h.result(timeout=60).state for h in handles]
    for n, ((_, steps, _, chosen), state) in enumerate(zip(cases, results, strict=True)):
        runs = [(s, start, end) for dag, s, start, end in LOG if dag == f"dag{n}"]
        assert sorted(s for s, _, _ in runs) == sorted(chosen)  # each chosen step exactly once
        span = {s: (start, end) for s, start, end in runs}
        needs = dict(steps)
        for s in chosen:
            for k in needs[s]:
                if k.startswith("k"):
                    assert span[s][0] >= span[f"s{k[1:]}"][1]
            assert state[f"k{s[1:]}"] == expected_value(steps, f"k{s[1:]}", inputs)
        assert {k for k in state if k.startswith("k")} == {f"k{s[1:]}" for s in chosen}
