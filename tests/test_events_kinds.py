"""The event kinds a user follows besides started/finished: a step's retries, a skipped
gate, a failed node and the run's error; ``ask_async`` with the documented prompt key."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from durapipe import Agent, App, EventType, NodeFailed, fn, gate
from durapipe.engine.ask import PROMPT_KEY
from durapipe.models import FakeModel
from test_events import check_history


def test_retries_skips_failures_and_ask_async(make_app: Callable[..., App]) -> None:
    calls: list[int] = []

    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        if len(calls) < 3:
            raise ValueError(f"flaky attempt {len(calls)}")
        return {"ok": True}

    def explode(state: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("no luck today")

    app = make_app("events-kinds", model=FakeModel({"writer": lambda r: f"on {r.prompt}"}))
    asked = app.pipeline("asked", fn(flaky, retries=3)
                         >> gate("review", "Ship?", when=lambda s: False)
                         >> Agent("writer").instruct("{prompt}").writes("text"))
    broken = app.pipeline("broken", fn(explode))
    with app:
        async def ask() -> str:
            return await asked.ask_async("durability", run_id="kinds-1")
        assert asyncio.run(ask()) == "on durability"
        assert app.get_run("kinds-1").result().state[PROMPT_KEY] == "durability"
        events = list(app.get_run("kinds-1").stream(timeout=30))
        with pytest.raises(NodeFailed, match="no luck today"):
            broken.run({}, run_id="kinds-2")
        failed = list(app.get_run("kinds-2").stream(timeout=30))

    check_history(events)
    retries = [e for e in events if e.type is EventType.RETRY]
    assert [(e.path, e.name, e.data["attempt"]) for e in retries] == [
        ("0.0", "flaky", 2), ("0.0", "flaky", 3)]
    at = {(e.type, e.path): e.offset for e in events}
    assert at[EventType.NODE_STARTED, "0.0"] < retries[0].offset < at[EventType.NODE_FINISHED, "0.0"]
    skipped = [e for e in events if e.type is EventType.NODE_SKIPPED]
    assert [(e.path, e.name, e.kind) for e in skipped] == [("0.1", "review", "gate")]
    types = [e.type for e in events]
    assert EventType.GATE_WAITING not in types and EventType.GATE_ANSWERED not in types

    check_history(failed)
    [node_failed] = [e for e in failed if e.type is EventType.NODE_FAILED]
    assert node_failed.name == "explode" and "no luck today" in node_failed.data["error"]
    assert failed[-1].data["status"] == "ERROR" and "no luck today" in failed[-1].data["error"]
