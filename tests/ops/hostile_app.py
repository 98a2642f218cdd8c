"""Pipelines whose names, node names, gate names and messages are hostile strings."""

from __future__ import annotations

from typing import Any

from durapipe import App, dispatch, fn, gate, join

DROP = "x'; DROP TABLE dbos.workflow_status; --"
NODE = "n\"o'de; DELETE FROM dbos.operation_outputs; -- [/] 100%_ ünï 🚀"
GATE = "g'ate\"; -- [red]%_"
MESSAGE = "Approve {title}? '); DROP SCHEMA dbos CASCADE; -- [/bold]"
TASK = "t'ask; --"

app = App("hostile-app")


def hostile_step(state: dict[str, Any]) -> dict[str, Any]:
    return {"echo": state["title"]}


def background(state: dict[str, Any]) -> dict[str, Any]:
    return {"bg": state["title"]}


def publish(state: dict[str, Any]) -> dict[str, Any]:
    return {"published": True}


plain = app.pipeline(DROP, fn(hostile_step, name=NODE)
                     >> dispatch(fn(background), names=[TASK]) >> join(TASK))
gated = app.pipeline("gated", fn(hostile_step, name=NODE) >> gate(GATE, MESSAGE) >> fn(publish))
