"""Builder functions: the public way to make nodes that are not Agents.

>>> pipeline = fn(load) >> transform(lambda s: {"n": len(s["rows"])}) >> fn(save)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .errors import BuildError
from .ir import Fn, Transform


def _keys(arg: Iterable[str] | None, what: str, owner: str) -> tuple[str, ...] | None:
    if arg is None:
        return None
    if isinstance(arg, str):
        arg = [arg]
    if not isinstance(arg, (list, tuple, set, frozenset)):
        raise BuildError(f"{owner}: {what} takes a state key or a list of keys, got {arg!r}")
    keys = tuple(arg)
    for k in keys:
        if not isinstance(k, str) or not k:
            raise BuildError(f"{owner}: {what} must be non-empty strings, got {k!r}")
    return keys


def _check_fn(f: Any, builder: str) -> None:
    if not callable(f) or isinstance(f, type):
        raise BuildError(f"{builder}({f!r}): expected a function taking the state dict")


def fn(
    f: Callable[..., Any],
    name: str | None = None,
    retries: int | None = None,
    *,
    reads: Iterable[str] | None = None,
    writes: Iterable[str] | None = None,
) -> Fn:
    """A function step: ``f(state) -> dict | None``, sync or async, run as a DBOS step.

    ``reads``/``writes`` declare the state keys it uses, so the pipeline is checked when it
    is registered (a read nothing upstream writes, two parallel branches writing one key).
    """
    _check_fn(f, "fn")
    label = name or getattr(f, "__name__", "fn")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
        raise BuildError(f"fn {label!r}: retries must be an int >= 0, got {retries!r}")
    return Fn(f, name, retries or 0, _keys(reads, "reads", f"fn {label!r}"),
              _keys(writes, "writes", f"fn {label!r}"))


def transform(
    f: Callable[..., Any],
    name: str | None = None,
    *,
    reads: Iterable[str] | None = None,
    writes: Iterable[str] | None = None,
) -> Transform:
    """A pure, deterministic ``f(state) -> dict | None`` run inline: no checkpoint, no DB write."""
    _check_fn(f, "transform")
    label = name or getattr(f, "__name__", "transform")
    return Transform(f, name, _keys(reads, "reads", f"transform {label!r}"),
                     _keys(writes, "writes", f"transform {label!r}"))
