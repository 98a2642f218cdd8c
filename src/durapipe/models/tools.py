"""Python functions as model tools: a JSON schema from the signature, validated calls.

>>> def get_weather(city: str, unit: str = "C") -> dict:
...     '''Current weather in a city.'''
>>> tool_spec(get_weather).parameters["required"]
['city']
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, get_type_hints

import pydantic

from ..errors import BuildError
from .base import ToolSpec


@dataclass(frozen=True)
class Tool:
    """A function ready to be offered to a model: its spec and the model validating its args."""

    func: Callable[..., Any]
    spec: ToolSpec
    args_model: type[pydantic.BaseModel]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    def bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validate and coerce the model's arguments; raises ``pydantic.ValidationError``."""
        parsed = self.args_model.model_validate(args)
        return {name: getattr(parsed, name) for name in type(parsed).model_fields}


def _description(f: Callable[..., Any]) -> str:
    doc = inspect.getdoc(f) or ""
    return doc.split("\n\n")[0].strip()


@lru_cache(maxsize=512)
def make_tool(f: Callable[..., Any]) -> Tool:
    """Inspect ``f`` once; a signature that cannot become a schema is a :class:`BuildError`."""
    name = getattr(f, "__name__", None)
    if isinstance(f, type) or not isinstance(name, str) or not name.isidentifier():
        raise BuildError(f"tool {f!r}: a tool must be a named function (def or async def)")
    try:
        hints = get_type_hints(f)
    except Exception as exc:
        raise BuildError(f"tool {name!r}: its type hints cannot be resolved ({exc})") from exc
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError) as exc:
        raise BuildError(f"tool {name!r}: its signature cannot be read ({exc})") from exc
    fields: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise BuildError(
                f"tool {name!r}: parameter {p.name!r} is {p.kind.description}; tools take named "
                "parameters only, so the model can pass them as JSON fields"
            )
        if p.name not in hints:
            raise BuildError(
                f"tool {name!r}: parameter {p.name!r} has no type annotation; annotate it "
                f"(e.g. {p.name}: str) so the model gets a schema"
            )
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hints[p.name], default)
    try:
        args_model = pydantic.create_model(f"{name}_args", **fields)
        schema = args_model.model_json_schema()
    except Exception as exc:
        raise BuildError(f"tool {name!r}: its parameters cannot be described as JSON ({exc})") from exc
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    schema.setdefault("required", [])
    return Tool(f, ToolSpec(name=name, description=_description(f), parameters=schema), args_model)


def make_tools(fns: tuple[Callable[..., Any], ...], agent: str) -> tuple[Tool, ...]:
    """Tools of one agent; two tools of one name are a :class:`BuildError`."""
    tools = tuple(make_tool(f) for f in fns)
    seen: set[str] = set()
    for t in tools:
        if t.name in seen:
            raise BuildError(f"Agent {agent!r}.tools(): two tools are named {t.name!r}; rename one")
        seen.add(t.name)
    return tools
