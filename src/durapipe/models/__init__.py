"""Models: the :class:`Model` protocol, Gemini, deterministic fakes, and model-string resolution.

>>> resolve_model("gemini-2.5-flash", "writer")      # a GeminiModel, key from the environment
>>> model, label = default_model(FakeModel({"writer": "offline text"}))
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ModelError
from .base import Model, ModelRequest, ModelResponse, StreamingModel, ToolCall, ToolSpec
from .fake import FakeModel, FunctionModel
from .gemini import KEY_VARS, GeminiModel, real_models_blocked

DEFAULT_GEMINI = "gemini-2.5-flash"
_by_name: dict[str, GeminiModel] = {}


def _gemini(name: str) -> GeminiModel:
    # One model (and so one client with its connection pool) per model name.
    model = _by_name.get(name)
    if model is None:
        model = _by_name[name] = GeminiModel(name)
    return model


def resolve_model(ref: Any, agent: str) -> Model:
    """Turn what an agent or App names as its model into a :class:`Model`.

    Strings naming a Gemini model (``"gemini-2.5-flash"``, ``"models/gemini-2.5-pro"``)
    become a :class:`GeminiModel` whose client is built from the environment.
    """
    if ref is None:
        raise ModelError(
            f"agent {agent!r} has no model: give Agent({agent!r}, model=...) or App(..., model=...)",
            agent=agent,
        )
    if isinstance(ref, str):
        if ref.removeprefix("models/").startswith("gemini"):
            return _gemini(ref.removeprefix("models/"))
        raise ModelError(
            f"agent {agent!r}: no model client is known for {ref!r}; name a Gemini model "
            "(e.g. 'gemini-2.5-flash') or pass a Model instance (GeminiModel, FakeModel, ...)",
            agent=agent, model=ref,
        )
    if not isinstance(ref, Model):
        raise ModelError(
            f"agent {agent!r}: {ref!r} is not a model (it needs a name and async generate(request))",
            agent=agent,
        )
    return ref


def gemini_configured() -> bool:
    """True when the environment holds Gemini credentials (an API key or Vertex settings)."""
    vertex = os.environ.get("GOOGLE_GENAI_USE_VERTEXAI", "").lower() in ("1", "true")
    return vertex or any(os.environ.get(v) for v in KEY_VARS)


def default_model(fake: Model, gemini: str | None = None) -> tuple[Model, str]:
    """Gemini when credentials are set (and real calls are not blocked), else ``fake``.

    Returns the model and a line saying which one was picked, for demos and examples.
    ``gemini`` defaults to ``DURAPIPE_GEMINI_MODEL`` or ``gemini-2.5-flash``.
    """
    name = gemini or os.environ.get("DURAPIPE_GEMINI_MODEL") or DEFAULT_GEMINI
    if gemini_configured() and not real_models_blocked():
        return _gemini(name), f"model: Gemini {name} (credentials from the environment)"
    return fake, "model: offline FakeModel (set GEMINI_API_KEY to use Gemini)"


__all__ = ["FakeModel", "FunctionModel", "GeminiModel", "Model", "ModelError", "ModelRequest",
           "ModelResponse", "StreamingModel", "ToolCall", "ToolSpec", "default_model",
           "gemini_configured", "resolve_model"]
