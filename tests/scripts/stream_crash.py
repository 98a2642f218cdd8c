"""A run streaming model tokens, killed mid-stream by the test and recovered by a new process.

Usage: stream_crash.py DATABASE_URL LOG_PATH MODE
MODE "crash": start run ``stream-run`` and stream slowly (the test SIGKILLs the process once
the log says ``streaming``); "recover": launch (recovering the run) and wait for its end.
Side effects (the fn step, each model call) are appended to LOG_PATH. The test process
imports this module too (``CONFIG`` set by hand) to run a peer of the app that reads the
run through its handles, and may take the recovered run over.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from durapipe import Agent, App, fn
from durapipe.models import ModelRequest, ModelResponse

CONFIG: dict[str, Any] = {"log": Path("effects.log"), "mode": "recover"}
WORDS = "one two three four five six seven eight".split()


def note(line: str) -> None:
    with CONFIG["log"].open("a") as f:
        f.write(line + "\n")


class SlowStreamer:
    """Streams its answer a word at a time; in the crashing process, slowly."""

    name = "slow"

    async def generate(self, request: ModelRequest) -> ModelResponse:
        return ModelResponse(text=" ".join(WORDS), model=self.name)

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelResponse]:
        note("model-call")
        for i in range(1, len(WORDS)):
            yield ModelResponse(text=" ".join(WORDS[:i]) + " ", model=self.name, finish_reason="")
            if i == 3:
                note("streaming")
            await asyncio.sleep(0.5 if CONFIG["mode"] == "crash" else 0.0)
        yield await self.generate(request)


def prepare(state: dict[str, Any]) -> dict[str, Any]:
    note("prepare")
    return {"topic": "x"}


def publish(state: dict[str, Any]) -> dict[str, Any]:
    note("publish")
    return {"done": True}


app = App("stream-crash", model=SlowStreamer())
pipeline = app.pipeline("story", fn(prepare) >> Agent("writer").instruct("{topic}")
                        .writes("text").stream_tokens() >> fn(publish))

if __name__ == "__main__":
    app.database_url, CONFIG["log"], CONFIG["mode"] = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    with app:
        if CONFIG["mode"] == "crash":
            pipeline.start({}, run_id="stream-run")
            time.sleep(3600)
        else:
            result = app.get_run("stream-run").result(timeout=60)
            print("RESULT", result.state["text"], flush=True)
