"""Deterministic models for tests and the offline demo.

>>> model = FakeModel(responses={"writer": "A post.", "seo": ["k1", "k2"]})
>>> model = FakeModel(lambda request: request.prompt.upper())
>>> model = FakeModel({"agent": [ToolCall("get_weather", {"city": "Paris"}), "Sunny."]})
>>> model = FunctionModel(lambda request: {"title": "T", "score": 3})   # structured output

A scripted answer is a text; a dict or pydantic model (sent as JSON, for ``.output(...)``);
a :class:`ToolCall` or a list of them (the model asks for tool calls); or a full
:class:`ModelResponse`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from ..errors import ModelError
from .base import ModelRequest, ModelResponse, ToolCall

Script = str | list[str] | Callable[[ModelRequest], Any]


def _tokens(text: str) -> int:
    return len(text.split())


def _request_tokens(request: ModelRequest) -> int:
    return _tokens(request.prompt) + sum(
        _tokens(json.dumps(m, sort_keys=True)) for m in request.messages)


def _is_calls(out: Any) -> bool:
    return isinstance(out, (list, tuple)) and bool(out) and all(isinstance(c, ToolCall) for c in out)


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
        return self._response(request, out)

    def _response(self, request: ModelRequest, out: Any) -> ModelResponse:
        if isinstance(out, ModelResponse):
            return out
        model = request.model or self.name
        if isinstance(out, ToolCall):
            out = [out]
        if _is_calls(out):
            return ModelResponse(text="", model=model, input_tokens=_request_tokens(request),
                                 output_tokens=len(out), finish_reason="tool_calls",
                                 tool_calls=tuple(out))
        if hasattr(out, "model_dump_json"):
            text = out.model_dump_json()
        elif isinstance(out, (dict, list)):
            text = json.dumps(out)
        else:
            text = str(out)
        return ModelResponse(
            text=text,
            model=model,
            input_tokens=_request_tokens(request),
            output_tokens=_tokens(text),
        )

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelResponse]:
        """The scripted answer, one word at a time: growing snapshots, the last complete."""
        final = await self.generate(request)
        words = final.text.split(" ")
        for i in range(1, len(words)):
            yield ModelResponse(text=" ".join(words[:i]) + " ", model=final.model,
                                input_tokens=final.input_tokens, finish_reason="")
            await asyncio.sleep(0)
        yield final


class FunctionModel(FakeModel):
    """A model answering with ``fn(request)`` (sync or async); the result is read like a
    :class:`FakeModel` script (text, dict, ToolCall(s) or ModelResponse).

    >>> model = FunctionModel(lambda req: [ToolCall("add", {"a": 1, "b": 2})] if not req.messages
    ...                       else "3")
    """

    name = "function"

    def __init__(self, fn: Callable[[ModelRequest], Any], *, delay: float = 0.0) -> None:
        if not callable(fn):
            raise TypeError("FunctionModel takes a function of the request")
        super().__init__(fn, delay=delay)
