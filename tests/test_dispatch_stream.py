"""An agent streaming inside a dispatched task publishes its partial text as progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dbutil import wait_for
from durapipe import Agent, App, dispatch, fn, join
from durapipe.models import ModelRequest, ModelResponse

WORDS = ["durable", "agents", "publish", "partial", "text"]


class SlowStreamingModel:
    """Streams one word every 0.15 s, so a reader can see the answer grow."""

    name = "slow-stream"

    async def generate(self, request: ModelRequest) -> ModelResponse:
        return ModelResponse(text=" ".join(WORDS), model=self.name)

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelResponse]:
        for i in range(1, len(WORDS)):
            yield ModelResponse(text=" ".join(WORDS[:i]), model=self.name, finish_reason="")
            await asyncio.sleep(0.15)
        yield await self.generate(request)


def after(state: dict[str, Any]) -> dict[str, Any]:
    return {"seen_after_join": state["seo"]}


def test_streamed_agent_text_is_published_while_it_runs(database_url: str) -> None:
    app = App("stream-app", database_url, model=SlowStreamingModel())
    p = app.pipeline("p", dispatch(Agent("seo").instruct("kw"), names=["seo"], progress_key="seo_progress")
                     >> join() >> fn(after))
    seen: list[str] = []
    with app:
        handle = p.start({}, run_id="stream-1")

        def grew() -> bool:
            value = handle.progress("seo")
            if isinstance(value, str) and (not seen or seen[-1] != value):
                seen.append(value)
            return value == " ".join(WORDS)

        wait_for(grew, timeout=30, what="the full streamed answer")
        result = handle.result(timeout=30)
    partial = [v for v in seen if v != " ".join(WORDS)]
    assert partial, f"no partial text was visible while streaming: {seen}"
    assert all(" ".join(WORDS).startswith(v) for v in seen)
    assert result.state["seo"] == " ".join(WORDS) == result.state["seen_after_join"]
