"""The pipeline IR: frozen dataclasses, one class per node kind.

Operators build new trees and never mutate. Node paths are positional: the root is ``0``,
its children ``0.0``, ``0.1``, ... in :meth:`Node.children` order, so a path names the
same node in every process that builds the same pipeline. The JSON shape and the content
hash are derived from the dataclass fields, never written by hand.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._ir_core import (
    OPTION,
    RETRY_COUNT,
    Fallback,
    Fn,
    Limit,
    Loop,
    Node,
    Parallel,
    Seq,
    Timeout,
    Until,
    _shape_value,
    as_node,
    callable_name,
)
from ._ir_core import StateFn as StateFn
from ._ir_core import check_limit as check_limit
from .errors import BuildError
from .retry import Retry


def template_keys(text: str) -> tuple[str, ...]:
    """The ``{key}`` names an instruction reads from state, in order."""
    keys: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise BuildError(
            f"instruction {text!r}: {exc}; write a literal brace as '{{{{' or '}}}}', "
            "and a state value as {topic}"
        ) from None
    for _, name, _, conversion in parsed:
        if name is None:
            continue
        root = name.split(".")[0].split("[")[0]
        if not root or root.isdigit():
            raise BuildError(f"instruction {text!r}: placeholders must name a state key, as {{topic}}")
        if conversion not in (None, "r", "s", "a"):
            raise BuildError(
                f"instruction {text!r}: {{{name}!{conversion}}} has an unknown conversion; "
                "use !r, !s or !a, or none"
            )
        if root not in keys:
            keys.append(root)
    return tuple(keys)


# -- leaf nodes ---------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class Agent(Node):
    """One LLM call (plus tool calls) as durable steps.

    >>> writer = Agent("writer").instruct("Write about {topic}.").writes("draft")
    """

    kind: ClassVar[str] = "agent"
    name: str
    model_ref: Any = None
    instruction: str | None = None
    output_key: str | None = None
    max_retries: int = field(default=0, metadata=RETRY_COUNT)
    tool_fns: tuple[Callable[..., Any], ...] = ()
    output_model: type | None = None
    turn_limit: int = 10
    retry_policy: Retry | None = field(default=None, metadata=OPTION)
    tokens: bool = field(default=False, metadata={"shape": False})

    def __init__(self, name: str, model: Any = None) -> None:
        if not isinstance(name, str) or not name.strip():
            raise BuildError(f"Agent({name!r}): the name must be a non-empty string")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "model_ref", model)
        object.__setattr__(self, "instruction", None)
        object.__setattr__(self, "output_key", None)
        object.__setattr__(self, "max_retries", 0)
        object.__setattr__(self, "tool_fns", ())
        object.__setattr__(self, "output_model", None)
        object.__setattr__(self, "turn_limit", 10)
        object.__setattr__(self, "retry_policy", None)

    @property
    def label(self) -> str:
        return self.name

    @property
    def key(self) -> str:
        """The state key the agent's answer is written to (its name unless ``writes`` says)."""
        return self.output_key or self.name

    def instruct(self, text: str) -> Agent:
        if not isinstance(text, str):
            raise BuildError(f"Agent {self.name!r}.instruct(): the instruction must be a string")
        try:
            template_keys(text)
        except BuildError as exc:
            raise BuildError(f"Agent {self.name!r}: {exc.message}", agent=self.name) from None
        return self._replace(instruction=text)  # type: ignore[no-any-return]

    def writes(self, key: str) -> Agent:
        if not isinstance(key, str) or not key:
            raise BuildError(f"Agent {self.name!r}.writes({key!r}): the key must be a non-empty string")
        return self._replace(output_key=key)  # type: ignore[no-any-return]

    def retries(self, n: int) -> Agent:
        """Short for ``.retry(Retry(attempts=n + 1, backoff=0.5))``: the whole agent runs again
        after a failure, each attempt durable. A ``.retry(...)`` policy, when given, wins."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise BuildError(f"Agent {self.name!r}.retries({n!r}): retries must be an int >= 0")
        return self._replace(max_retries=n)  # type: ignore[no-any-return]

    def retry(self, policy: Retry | None) -> Agent:
        """Run the whole agent again when it fails, each attempt durable (see :class:`Retry`)."""
        if policy is not None and not isinstance(policy, Retry):
            raise BuildError(f"Agent {self.name!r}.retry({policy!r}): give Retry(attempts=..., ...)")
        return self._replace(retry_policy=policy)  # type: ignore[no-any-return]

    def model(self, m: Any) -> Agent:
        return self._replace(model_ref=m)  # type: ignore[no-any-return]

    def tools(self, *fns: Callable[..., Any]) -> Agent:
        """Offer typed functions (sync or async) to the model through function calling."""
        from .models.tools import make_tools

        for f in fns:
            if not callable(f):
                raise BuildError(f"Agent {self.name!r}.tools(): {f!r} is not a function")
        make_tools(tuple(fns), self.name)  # a signature that cannot become a schema fails here
        return self._replace(tool_fns=tuple(fns))  # type: ignore[no-any-return]

    def max_turns(self, n: int) -> Agent:
        """Bound the model requests of one run of this agent (tool loops and output retries)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BuildError(f"Agent {self.name!r}.max_turns({n!r}): the bound must be an int >= 1")
        return self._replace(turn_limit=n)  # type: ignore[no-any-return]

    def stream_tokens(self, on: bool = True) -> Agent:
        """Stream the model's text to the run's event stream as it arrives (token events)."""
        return self._replace(tokens=bool(on))  # type: ignore[no-any-return]

    def output(self, schema: type) -> Agent:
        if not (isinstance(schema, type) and hasattr(schema, "model_validate")):
            raise BuildError(f"Agent {self.name!r}.output(): give a pydantic BaseModel class")
        return self._replace(output_model=schema)  # type: ignore[no-any-return]

    def reads(self) -> tuple[str, ...]:
        return template_keys(self.instruction) if self.instruction else ()


@dataclass(frozen=True)
class Transform(Node):
    """A pure state function run inline on every replay: no checkpoint, no DB write."""

    kind: ClassVar[str] = "transform"
    func: Callable[..., Any]
    name: str | None = None
    reads: tuple[str, ...] | None = None
    writes: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return self.name or str(getattr(self.func, "__name__", "transform"))


@dataclass(frozen=True)
class Sleep(Node):
    """Durable sleep."""

    kind: ClassVar[str] = "sleep"
    seconds: float


# -- composite nodes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Route(Node):
    kind: ClassVar[str] = "route"
    selector: str | Callable[[dict[str, Any]], Any]
    branches: tuple[tuple[Any, Node], ...]
    default: Node | None = None

    def children(self) -> tuple[Node, ...]:
        nodes = tuple(n for _, n in self.branches)
        return nodes + ((self.default,) if self.default is not None else ())

    def shape(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "selector": _shape_value(self.selector),
            "branches": [[_shape_value(v), n.shape()] for v, n in self.branches],
            "default": self.default.shape() if self.default is not None else None,
        }


@dataclass(frozen=True)
class Race(Node):
    kind: ClassVar[str] = "race"
    branches: tuple[Node, ...]

    def children(self) -> tuple[Node, ...]:
        return self.branches


@dataclass(frozen=True)
class MapOver(Node):
    kind: ClassVar[str] = "map"
    items_key: str
    body: Node
    output_key: str
    # Items at once within the run (a map's own bound; limit() bounds across runs).
    concurrency: int | None = None  # type: ignore[assignment]
    item_key: str = "item"
    # "collect": a failed item leaves None at its place; its error goes to errors_key.
    errors: str = field(default="raise", metadata=OPTION)
    errors_key: str | None = field(default=None, metadata=OPTION)

    def children(self) -> tuple[Node, ...]:
        return (self.body,)

    @property
    def failures_key(self) -> str:
        """Where collected failures go: ``errors_key``, else ``<output_key>_errors``."""
        return self.errors_key or f"{self.output_key}_errors"


@dataclass(frozen=True)
class Dispatch(Node):
    """Fire-and-continue: start each task as a background child workflow."""

    kind: ClassVar[str] = "dispatch"
    tasks: tuple[Node, ...]
    names: tuple[str, ...]
    on_complete: Callable[..., Any] | None = None
    on_error: Callable[..., Any] | None = None
    progress_key: str | None = None
    max_tasks: int | None = None
    queue: str | None = None
    # Detached tasks outlive the run: never joined (not even at its end), cancellable by name.
    detach: bool = field(default=False, metadata=OPTION)

    def children(self) -> tuple[Node, ...]:
        return self.tasks


@dataclass(frozen=True)
class Join(Node):
    """Barrier: wait for the named background tasks (all pending ones when none named)."""

    kind: ClassVar[str] = "join"
    names: tuple[str, ...] = ()
    timeout_seconds: float | None = None


@dataclass(frozen=True)
class Gate(Node):
    """Human approval: the run suspends durably until approved or rejected."""

    kind: ClassVar[str] = "gate"
    name: str
    message: str
    when: Callable[[dict[str, Any]], Any] | None = None
    timeout_seconds: float | None = None
    approvers: tuple[str, ...] | None = None
    on_timeout: str = "reject"

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True)
class Patched(Node):
    """Old and new code side by side: runs started by a pipeline that has this marker take
    ``new`` (at ``<path>.0``); runs recorded by an older shape without it take ``old``
    (at ``<path>.1``)."""

    kind: ClassVar[str] = "patched"
    name: str
    new: Node
    old: Node

    def children(self) -> tuple[Node, ...]:
        return (self.new, self.old)

    @property
    def label(self) -> str:
        return self.name


__all__ = [
    "OPTION", "RETRY_COUNT", "Agent", "Dispatch", "Fallback", "Fn", "Gate", "Join", "Limit", "Loop", "MapOver", "Node",
    "Parallel", "Patched", "Race", "Route", "Seq", "Sleep", "Timeout", "Transform", "Until",
    "as_node", "callable_name", "template_keys",
]
