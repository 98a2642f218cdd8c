"""Deterministic models for tests and the offline demo.

>>> model = FakeModel(responses={"writer": "A post.", "seo": ["k1", "k2"]})
>>> model = FakeModel(lambda request: request.prompt.upper())
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ModelError
from .base import ModelRequest, ModelResponse

Script = str | list[str] | Callable[[ModelRequest], Any]


def _tokens(text: str) -> int:
    return len(text.split())


class FakeModel:
    """A scripted model: per agent name a text, a list of texts (one per call, the last
    repeats) or a function of the request; or one function for every agent.

    ``delay`` (seconds, or per agent name) simulates latency. ``calls`` records every request.
    """

    name = "fake"

    def __init__(
        self,
        responses: Mapping[str, Script] | Callable[[ModelRequest], Any] | None = None,
        *,
        delay: float | Mapping[str, float] = 0.0,
    ) -> None:
        if responses is None:
            responses = {}
        self._fn: Callable[[ModelRequest], Any] | None = None
        self._responses: dict[str, Script] = {}
        if callable(responses) and not isinstance(responses, Mapping):
            self._fn = responses
        elif isinstance(responses, Mapping):
            self._responses = dict(responses)
        else:
            raise TypeError("FakeModel takes a dict of agent name -> script, or a function")
        self._delay = delay
        self._counts: dict[str, int] = {}
        self.calls: list[ModelRequest] = []

    def _script_for(self, request: ModelRequest) -> Any:
        if self._fn is not None:
            return self._fn
        if request.agent not in self._responses:
            raise ModelError(
                f"FakeModel has no response for agent {request.agent!r}; "
                f"scripted agents: {sorted(self._responses)}",
                agent=request.agent,
            )
        return self._responses[request.agent]

    async def generate(self, request: ModelRequest) -> ModelResponse:
        self.calls.append(request)
        n = self._counts.get(request.agent, 0)
        self._counts[request.agent] = n + 1
        delay = self._delay.get(request.agent, 0.0) if isinstance(self._delay, Mapping) else self._delay
        if delay:
            await asyncio.sleep(delay)
        script = self._script_for(request)
        if isinstance(script, list):
            if not script:
                raise ModelError(f"FakeModel script for {request.agent!r} is empty", agent=request.agent)
            out: Any = script[min(n, len(script) - 1)]
        elif callable(script):
            out = script(request)
            if inspect.isawaitable(out):
                out = await out
        else:
            out = script
        if isinstance(out, ModelResponse):
            return out
        text = str(out)
        return ModelResponse(
            text=text,
            model=request.model or self.name,
            input_tokens=_tokens(request.prompt),
            output_tokens=_tokens(text),
        )
