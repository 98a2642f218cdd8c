"""One status per node from real runs: a route's branch not taken is SKIPPED once the run
has ended, loop passes (0.1#2) count for their node, parallel branches resolve, a failed
node is ERROR and the nodes after it stay PENDING; nodes that record nothing (joins,
transforms) are done once the run has passed them, also at the very end of the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from durapipe import App, NodeFailed, Pipeline, dispatch, fn, join, route, transform
from durapipe.engine.admin import Admin
from durapipe.runview import node_statuses


def pick(state: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "a"}


def a(state: dict[str, Any]) -> dict[str, Any]:
    return {"a": True}


def b(state: dict[str, Any]) -> dict[str, Any]:
    return {"b": True}


def bump(state: dict[str, Any]) -> dict[str, Any]:
    return {"n": state.get("n", 0) + 1}


def left(state: dict[str, Any]) -> dict[str, Any]:
    return {"left": 1}


def right(state: dict[str, Any]) -> dict[str, Any]:
    return {"right": 1}


def boom(state: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


def test_statuses_of_routes_loops_parallel_and_failures(make_app: Callable[..., App], database_url: str) -> None:
    app = make_app("runview")
    shapes = {
        "routed": fn(pick) >> route("kind", {"a": fn(a), "b": fn(b)}) >> (fn(bump) * 3)
        >> (fn(left) | fn(right)),
        "failing": fn(pick) >> fn(boom) >> fn(a),
        # record-less nodes: a parallel of transforms before a step, a transform and a
        # route before the join that ends the run (the route's other branch not taken)
        "quiet": fn(pick) >> dispatch(fn(b), names=["t"]) >> (transform(left) | transform(right))
        >> fn(a) >> transform(bump) >> route("kind", {"a": fn(bump), "b": transform(a)}) >> join("t"),
    }
    for name, node in shapes.items():
        app.pipeline(name, node)
    with app:
        Pipeline(app, app.registered("routed")).run({}, run_id="rv-1")
        with pytest.raises(NodeFailed):
            Pipeline(app, app.registered("failing")).run({}, run_id="rv-2")
        Pipeline(app, app.registered("quiet")).run({}, run_id="rv-3")
    with Admin(database_url) as admin:
        routed = node_statuses(shapes["routed"], admin.tree("rv-1"))
        failing = node_statuses(shapes["failing"], admin.tree("rv-2"))
        quiet = node_statuses(shapes["quiet"], admin.tree("rv-3"))
    assert routed == {"0": "SUCCESS", "0.0": "SUCCESS", "0.1": "SUCCESS", "0.1.0": "SUCCESS",
                      "0.1.1": "SKIPPED", "0.2": "SUCCESS", "0.2.0": "SUCCESS",
                      "0.3": "SUCCESS", "0.3.0": "SUCCESS", "0.3.1": "SUCCESS"}
    assert failing == {"0": "ERROR", "0.0": "SUCCESS", "0.1": "ERROR", "0.2": "PENDING"}
    assert quiet == {"0": "SUCCESS", "0.0": "SUCCESS", "0.1": "SUCCESS", "0.1.0": "SUCCESS",
                     "0.2": "SUCCESS", "0.2.0": "SUCCESS", "0.2.1": "SUCCESS", "0.3": "SUCCESS",
                     "0.4": "SUCCESS", "0.5": "SUCCESS", "0.5.0": "SUCCESS", "0.5.1": "SKIPPED",
                     "0.6": "SUCCESS"}
