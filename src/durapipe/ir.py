"""The pipeline IR: frozen dataclasses, one class per node kind.

Operators build new trees and never mutate. Node paths are positional: the root is ``0``,
its children ``0.0``, ``0.1``, ... in :meth:`Node.children` order, so a path names the
same node in every process that builds the same pipeline. The JSON shape and the content
hash are derived from the dataclass fields, never written by hand.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .errors import BuildError
from .retry import Retry

# Field metadata of an option added after pipelines were deployed: left out of the shape
# while it has its default, so adding the option changes no existing pipeline's hash.
OPTION: dict[str, Any] = {"option": True}

StateFn = Callable[[dict[str, Any]], Any]


def callable_name(f: Any) -> str:
    """A stable text name for a function: its qualified name, never its module.

    The same source imported as ``__main__``, as ``pkg.mod`` or from another working
    directory names its functions alike, so it registers the same pipeline version.
    """
    qual = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__
    return str(qual)


def _shape_value(v: Any) -> Any:
    if isinstance(v, (Node, Retry)):
        return v.shape()
    if isinstance(v, (list, tuple)):
        return [_shape_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _shape_value(x) for k, x in v.items()}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, type):
        return callable_name(v)
    if callable(v) and not hasattr(v, "generate"):
        return callable_name(v)
    name = getattr(v, "name", None)
    return name if isinstance(name, str) else type(v).__name__


@dataclass(frozen=True)
class Node:
    """Base of every node. Supports ``>>``, ``|``, ``//``, ``*`` and ``.timeout()``."""

    kind: ClassVar[str] = "node"

    def children(self) -> tuple[Node, ...]:
        return ()

    @property
    def label(self) -> str:
        """The name used in step names: ``<path>:<label>``."""
        return self.kind

    # -- operators --------------------------------------------------------------------
    def __rshift__(self, other: Any) -> Seq:
        return Seq(_flatten(Seq, (self, as_node(other, "right side of >>"))))

    def __rrshift__(self, other: Any) -> Seq:
        return Seq(_flatten(Seq, (as_node(other, "left side of >>"), self)))

    def __or__(self, other: Any) -> Parallel:
        return Parallel(_flatten(Parallel, (self, as_node(other, "right side of |"))))

    def __ror__(self, other: Any) -> Parallel:
        return Parallel(_flatten(Parallel, (as_node(other, "left side of |"), self)))

    def __floordiv__(self, other: Any) -> Fallback:
        return Fallback(_flatten(Fallback, (self, as_node(other, "right side of //"))))

    def __rfloordiv__(self, other: Any) -> Fallback:
        return Fallback(_flatten(Fallback, (as_node(other, "left side of //"), self)))

    def __mul__(self, times: Any) -> Loop:
        if isinstance(times, Until):
            return Loop(self, until=times)
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise BuildError(
                f"{self.label} * {times!r}: a loop takes a whole number >= 1 or until(pred, max=n)"
            )
        return Loop(self, times=times)

    __rmul__ = __mul__

    def timeout(self, seconds: float) -> Timeout:
        """Fail this node with ``NodeTimeout`` when it runs longer than ``seconds``."""
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
            raise BuildError(f"{self.label}.timeout({seconds!r}): seconds must be a number > 0")
        return Timeout(self, float(seconds))

    def concurrency(self, n: int, *, adaptive: bool = False) -> Limit:
        """At most ``n`` executions of this node at once, across all runs and workers of
        the app (the key is the node's label); see ``durapipe.limit``."""
        return Limit(self, self.label, check_limit(n, adaptive, f"{self.label}.concurrency"),
                     adaptive)

    # -- derived data -----------------------------------------------------------------
    def shape(self) -> dict[str, Any]:
        """The JSON shape: kind plus every field, children nested, functions by name."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("shape", True):  # how a node runs, not what it records
                continue
            if f.metadata.get("option") and value == f.default:
                continue
            out[f.name] = _shape_value(value)
        return out

    def digest(self) -> str:
        """A content hash of the shape: equal pipelines hash equal in every process."""
        text = json.dumps(self.shape(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def walk(self, path: str = "0") -> Iterator[tuple[str, Node]]:
        """Every node of the tree with its path, parents first."""
        yield path, self
        for i, child in enumerate(self.children()):
            yield from child.walk(f"{path}.{i}")

    def _replace(self, **changes: Any) -> Any:
        new = copy.copy(self)
        for k, v in changes.items():
            object.__setattr__(new, k, v)
        return new


def _flatten(cls: type[Node], nodes: tuple[Node, ...]) -> tuple[Node, ...]:
    out: list[Node] = []
    for n in nodes:
        if type(n) is cls and getattr(n, "errors", "raise") == "raise":
            out.extend(n.children())
        else:
            out.append(n)
    return tuple(out)


def as_node(x: Any, where: str = "pipeline") -> Node:
    """Coerce a bare callable to :class:`Fn`; anything else that is not a node is a BuildError."""
    if isinstance(x, Node):
        return x
    if isinstance(x, Until):
        raise BuildError(f"{where}: until(...) goes after '*', as in node * until(pred, max=10)")
    if getattr(x, "wraps_nodes", False):
        raise BuildError(f"{where}: {x!r} wraps a node rather than being one: apply it, as in "
                         "limit(key, concurrency=n)(node), or write limit(key, node, concurrency=n)")
    if callable(x) and not isinstance(x, type):
        return Fn(x)
    raise BuildError(
        f"{where}: {x!r} (a {type(x).__name__}) is not a node; use Agent(...), fn(f), "
        "transform(f) or a function taking the state dict"
    )


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
    max_retries: int = 0
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
class Fn(Node):
    """A function step: ``func(state) -> dict | None`` (sync or async), run as a DBOS step."""

    kind: ClassVar[str] = "fn"
    func: Callable[..., Any]
    name: str | None = None
    max_retries: int = 0
    reads: tuple[str, ...] | None = None
    writes: tuple[str, ...] | None = None
    retry: Retry | None = field(default=None, metadata=OPTION)

    @property
    def label(self) -> str:
        return self.name or str(getattr(self.func, "__name__", "fn"))

    @property
    def retry_policy(self) -> Retry | None:
        return self.retry

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)


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
class Seq(Node):
    kind: ClassVar[str] = "seq"
    nodes: tuple[Node, ...]

    def children(self) -> tuple[Node, ...]:
        return self.nodes


@dataclass(frozen=True)
class Parallel(Node):
    """All branches run concurrently; their writes are merged in branch order."""

    kind: ClassVar[str] = "parallel"
    branches: tuple[Node, ...]
    # "collect": a failed branch does not fail the node; its error goes to errors_key.
    errors: str = field(default="raise", metadata=OPTION)
    errors_key: str | None = field(default=None, metadata=OPTION)

    def children(self) -> tuple[Node, ...]:
        return self.branches


@dataclass(frozen=True)
class Fallback(Node):
    """Try each attempt in order; the first success wins."""

    kind: ClassVar[str] = "fallback"
    attempts: tuple[Node, ...]

    def children(self) -> tuple[Node, ...]:
        return self.attempts


@dataclass(frozen=True)
class Until:
    """Loop condition for ``node * until(pred, max=10)``."""

    pred: Callable[[dict[str, Any]], Any]
    max: int = 10

    def __post_init__(self) -> None:
        if not callable(self.pred):
            raise BuildError(f"until({self.pred!r}): the predicate must be a function of state")
        if isinstance(self.max, bool) or not isinstance(self.max, int) or self.max < 1:
            raise BuildError(f"until(..., max={self.max!r}): max must be an int >= 1")


@dataclass(frozen=True)
class Loop(Node):
    kind: ClassVar[str] = "loop"
    body: Node
    times: int | None = None
    until: Until | None = None

    def children(self) -> tuple[Node, ...]:
        return (self.body,)

    def shape(self) -> dict[str, Any]:
        out = {"kind": self.kind, "body": self.body.shape(), "times": self.times}
        if self.until is not None:
            out["until"] = {"pred": callable_name(self.until.pred), "max": self.until.max}
        return out


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
class Timeout(Node):
    kind: ClassVar[str] = "timeout"
    body: Node
    seconds: float

    def children(self) -> tuple[Node, ...]:
        return (self.body,)

    @property
    def label(self) -> str:
        return f"timeout({self.body.label})"


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


def check_limit(n: Any, adaptive: Any, where: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BuildError(f"{where}({n!r}): concurrency must be a whole number >= 1")
    if not isinstance(adaptive, bool):
        raise BuildError(f"{where}: adaptive must be True or False, got {adaptive!r}")
    return n


@dataclass(frozen=True)
class Limit(Node):
    """At most ``n`` executions of ``body`` (and of every node sharing ``key``) at once
    across the app's runs and workers; ``adaptive`` lowers it on overload (AIMD)."""

    kind: ClassVar[str] = "limit"
    body: Node
    key: str
    n: int
    adaptive: bool = False

    def children(self) -> tuple[Node, ...]:
        return (self.body,)

    @property
    def label(self) -> str:
        return f"limit({self.key})"


__all__ = [
    "OPTION", "Agent", "Dispatch", "Fallback", "Fn", "Gate", "Join", "Limit", "Loop", "MapOver", "Node",
    "Parallel", "Patched", "Race", "Route", "Seq", "Sleep", "Timeout", "Transform", "Until",
    "as_node", "callable_name", "template_keys",
]
