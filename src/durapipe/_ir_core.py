"""The IR's core: :class:`Node`, its operators and the node kinds they build.

``>>``, ``|``, ``//``, ``*``, ``.timeout()`` and ``.concurrency()`` build :class:`Seq`,
:class:`Parallel`, :class:`Fallback`, :class:`Loop` (with :class:`Until`),
:class:`Timeout` and :class:`Limit`; :func:`as_node` makes a bare function a :class:`Fn`.
Every other node kind is in :mod:`durapipe.ir`, which re-exports these: import from there.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .errors import BuildError
from .retry import Retry

# Field metadata of an option added after pipelines were deployed: left out of the shape
# while it has its default, so adding the option changes no existing pipeline's hash.
OPTION: dict[str, Any] = {"option": True}

# Field metadata of a retry count (``retries=n``). It used to mean DBOS's retries inside one
# step and now means a durable Retry (each attempt and decision a step of its own), so a
# node with a count has a new shape: a run recorded under the old meaning that has passed
# the node is never replayed on the new one (it waits for a worker with its shape, as after
# any change of a node it passed). A count of 0 leaves the shape as it was.
RETRY_COUNT: dict[str, Any] = {"retry_count": True}

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
            if f.metadata.get("retry_count") and value:
                out["retry_count_means"] = "durable attempts"
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


@dataclass(frozen=True)
class Fn(Node):
    """A function step: ``func(state) -> dict | None`` (sync or async), run as a DBOS step."""

    kind: ClassVar[str] = "fn"
    func: Callable[..., Any]
    name: str | None = None
    max_retries: int = field(default=0, metadata=RETRY_COUNT)
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


# -- nodes the operators build --------------------------------------------------------


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
class Timeout(Node):
    kind: ClassVar[str] = "timeout"
    body: Node
    seconds: float

    def children(self) -> tuple[Node, ...]:
        return (self.body,)

    @property
    def label(self) -> str:
        return f"timeout({self.body.label})"


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
