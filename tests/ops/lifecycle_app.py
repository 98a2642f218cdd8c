"""Lifecycle test app: a run with an async step that sleeps ``LIFE_SLOW`` seconds (default
30) between two quick steps. Every step appends ``<label> <pid>`` to the file ``log`` names."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from durapipe import App, fn

app = App("ops-life")
SLOW = float(os.environ.get("LIFE_SLOW", "30"))


def note(state: dict[str, Any], label: str) -> None:
    with open(state["log"], "a") as f:
        f.write(f"{label} {os.getpid()}\n")


def first(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "first")
    return {"first": True}


async def slow(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "slow-start")
    await asyncio.sleep(SLOW)
    note(state, "slow-end")
    return {"slow": True}


def last(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "last")
    return {"last": True}


def quick(state: dict[str, Any]) -> dict[str, Any]:
    note(state, "quick")
    return {"quick": True}


steps = app.pipeline("steps", fn(first) >> fn(slow) >> fn(last), inputs=["log"])
once = app.pipeline("once", fn(quick), inputs=["log"])
