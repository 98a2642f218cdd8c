"""Models: the :class:`Model` protocol, deterministic fakes, and model-string resolution."""

from __future__ import annotations

from typing import Any

from ..errors import ModelError
from .base import Model, ModelRequest, ModelResponse, ToolCall, ToolSpec
from .fake import FakeModel


def resolve_model(ref: Any, agent: str) -> Model:
    """Turn what an agent or App names as its model into a :class:`Model`."""
    if ref is None:
        raise ModelError(
            f"agent {agent!r} has no model: give Agent({agent!r}, model=...) or App(..., model=...)",
            agent=agent,
        )
    if isinstance(ref, str):
        raise ModelError(
            f"agent {agent!r}: no model client is available for {ref!r}; pass a Model "
            "instance (e.g. FakeModel) to the Agent or the App",
            agent=agent, model=ref,
        )
    if not isinstance(ref, Model):
        raise ModelError(
            f"agent {agent!r}: {ref!r} is not a model (it needs a name and async generate(request))",
            agent=agent,
        )
    return ref


__all__ = ["FakeModel", "Model", "ModelError", "ModelRequest", "ModelResponse", "ToolCall",
           "ToolSpec", "resolve_model"]
