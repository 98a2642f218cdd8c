"""The model protocol: one async call from a request to a response.

Requests and responses are plain dataclasses whose ``to_json`` is what a step records, so
SQL can read text, model, token usage and latency of every call. API keys live in model
clients, never in requests, responses or state.

A conversation is the rendered ``prompt`` (the first user turn) followed by ``messages``,
each a JSON object in one provider-neutral form:

- ``{"role": "model", "text": str, "tool_calls": [ToolCall.to_json(), ...]}``
- ``{"role": "tool", "results": [{"name": str, "id": str | None, "response": {...}}]}``
- ``{"role": "user", "text": str}`` (e.g. a request to fix an invalid structured answer)
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: name, description and JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asked for. ``signature`` is an opaque provider token
    (Gemini's thought signature, base64) that must be sent back with the call."""

    name: str
    args: dict[str, Any]
    id: str | None = None
    signature: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ToolCall:
        return cls(name=data["name"], args=dict(data.get("args") or {}), id=data.get("id"),
                   signature=data.get("signature"))


@dataclass(frozen=True)
class ModelRequest:
    """What an agent asks: its name, the rendered prompt, the conversation so far, tools, schema."""

    agent: str
    prompt: str
    model: str | None = None
    messages: tuple[dict[str, Any], ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    output_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelResponse:
    """One answer. ``output_tokens`` includes thinking tokens (they are billed as output)."""

    text: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "stop"
    tool_calls: tuple[ToolCall, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tool_calls"] = [asdict(c) for c in self.tool_calls]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelResponse:
        calls = tuple(ToolCall.from_json(c) for c in data.get("tool_calls") or ())
        keep = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "tool_calls"}
        return cls(**keep, tool_calls=calls)


@runtime_checkable
class Model(Protocol):
    """Anything with a ``name`` and ``async generate(request) -> ModelResponse``."""

    name: str

    async def generate(self, request: ModelRequest) -> ModelResponse: ...


@runtime_checkable
class StreamingModel(Model, Protocol):
    """A model that can also stream: ``stream(request)`` yields growing snapshots of the
    answer (``text`` is the text so far); the last one is the complete response."""

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelResponse]: ...




_overload_listener: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "durapipe_overload_listener", default=None)


def report_overload(why: str) -> None:
    """Called by a model client for each 429, 5xx or timeout it retries by itself, so the
    adaptive limits around the call (``limit(..., adaptive=True)``) see it too."""
    listener = _overload_listener.get()
    if listener is not None:
        listener(why)


def listen_for_overloads(listener: Callable[[str], None] | None) -> contextvars.Token[Any]:
    return _overload_listener.set(listener)


def stop_listening(token: contextvars.Token[Any]) -> None:
    _overload_listener.reset(token)
