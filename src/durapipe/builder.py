"""Builder functions: the public way to make nodes that are not Agents.

>>> pipeline = fn(load) >> transform(lambda s: {"n": len(s["rows"])}) >> fn(save)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .errors import BuildError
from .ir import Dispatch, Fn, Join, Transform, as_node


def _keys(arg: Iterable[str] | None, what: str, owner: str) -> tuple[str, ...] | None:
    if arg is None:
        return None
    if isinstance(arg, str):
        arg = [arg]
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


def _positive_int(value: Any, what: str, owner: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BuildError(f"{owner}: {what} must be an int >= 1, got {value!r}")
    return value


def dispatch(
    *nodes: Any,
    names: Iterable[str] | None = None,
    on_complete: Callable[..., Any] | None = None,
    on_error: Callable[..., Any] | None = None,
    progress_key: str | None = None,
    max_tasks: int | None = None,
    queue: str | None = None,
) -> Dispatch:
    """Fire-and-continue: start each node as a background task and go on at once.

    Each task runs as a durable child workflow; :func:`join` collects its writes later (a
    task never joined is joined when the run ends). ``names`` default to the nodes' labels.
    ``on_complete(name, result)`` / ``on_error(name, exc)`` run once per finished task,
    inside the task, so they never block the main pipeline. With ``progress_key``, values a
    task publishes with :func:`durapipe.progress` appear in ``state[progress_key]`` for the
    nodes after the dispatch. ``max_tasks`` bounds how many of the tasks run at once;
    ``queue`` puts them on a named DBOS queue any worker process of the app can dequeue.

    >>> pipeline = writer >> dispatch(email, seo, names=["email", "seo"]) >> formatter >> join()
    """
    owner = "dispatch(...)"
    if not nodes:
        raise BuildError(f"{owner}: give at least one node to run in the background")
    tasks = tuple(as_node(n, f"{owner} task {i}") for i, n in enumerate(nodes))
    if names is None:
        labels = tuple(t.label for t in tasks)
    else:
        labels = _keys(names, "names", owner) or ()
        if len(labels) != len(tasks):
            raise BuildError(
                f"{owner}: {len(tasks)} nodes but {len(labels)} names {list(labels)}; "
                "give one name per node"
            )
    seen: set[str] = set()
    for name in labels:
        if name in seen:
            raise BuildError(
                f"dispatch of {list(labels)}: the task name {name!r} appears twice; give each "
                "task its own name with names=[...]", name=name,
            )
        seen.add(name)
    for cb, what in ((on_complete, "on_complete"), (on_error, "on_error")):
        if cb is not None and (not callable(cb) or isinstance(cb, type)):
            raise BuildError(f"{owner}: {what} must be a function (name, value), got {cb!r}")
    if progress_key is not None and (not isinstance(progress_key, str) or not progress_key):
        raise BuildError(f"{owner}: progress_key must be a non-empty string, got {progress_key!r}")
    if queue is not None and (not isinstance(queue, str) or not queue or queue.startswith("_dbos_")):
        raise BuildError(f"{owner}: queue must be a queue name (not starting with _dbos_), got {queue!r}")
    return Dispatch(tasks, labels, on_complete, on_error, progress_key,
                    _positive_int(max_tasks, "max_tasks", owner), queue)


def join(*names: str, timeout: float | None = None) -> Join:
    """Barrier: wait for the named background tasks (all pending ones when none is named).

    Their writes are merged into state in dispatch order. Past ``timeout`` seconds (a
    durable deadline: a restart does not reset it) unfinished tasks are cancelled, recorded
    as timed out, and their writes dropped. A failed task makes the join raise
    ``NodeFailed`` naming it, unless its dispatch has ``on_error``.

    >>> pipeline = dispatch(email, seo) >> formatter >> join("seo_optimizer", timeout=30)
    """
    for n in names:
        if not isinstance(n, str) or not n:
            raise BuildError(f"join{names!r}: task names must be non-empty strings, got {n!r}")
    if len(set(names)) != len(names):
        raise BuildError(f"join{names!r}: a task name appears twice")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
        raise BuildError(f"join{names!r}: timeout must be a number of seconds > 0, got {timeout!r}")
    return Join(tuple(names), None if timeout is None else float(timeout))
