"""Builder functions: the public way to make nodes that are not Agents.

>>> pipeline = fn(load) >> transform(lambda s: {"n": len(s["rows"])}) >> fn(save)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import BuildError
from .ir import (
    Dispatch,
    Fn,
    Gate,
    Join,
    Limit,
    MapOver,
    Node,
    Parallel,
    Patched,
    Race,
    Route,
    Sleep,
    Transform,
    Until,
    as_node,
    check_limit,
    template_keys,
)
from .retry import Retry, as_retry


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
    retry: Retry | None = None,
) -> Fn:
    """A function step: ``f(state) -> dict | None``, sync or async, run as a DBOS step.

    ``reads``/``writes`` declare the state keys it uses, so the pipeline is checked when it
    is registered (a read nothing upstream writes, two parallel branches writing one key).
    It runs once unless told otherwise: ``retry=Retry(attempts=5, backoff=1)`` tries it
    again after a failure, each attempt recorded (a restart resumes the count);
    ``retries=n`` is the short form of ``retry=Retry(attempts=n + 1, backoff=0.5)``.
    """
    _check_fn(f, "fn")
    label = name or getattr(f, "__name__", "fn")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
        raise BuildError(f"fn {label!r}: retries must be an int >= 0, got {retries!r}")
    if retries and retry is not None:
        raise BuildError(f"fn {label!r}: give retries={retries} or retry={retry!r}, not both "
                         f"(retries={retries} is short for retry=Retry(attempts={retries + 1}, "
                         "backoff=0.5))")
    return Fn(f, name, retries or 0, _keys(reads, "reads", f"fn {label!r}"),
              _keys(writes, "writes", f"fn {label!r}"), as_retry(retry, f"fn {label!r}"))


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
    detach: bool = False,
) -> Dispatch:
    """Fire-and-continue: start each node as a background task and go on at once.

    Each task runs as a durable child workflow; :func:`join` collects its writes later (a
    task never joined is joined when the run ends). ``names`` default to the nodes' labels.
    ``on_complete(name, result)`` / ``on_error(name, exc)`` run once per finished task,
    inside the task, so they never block the main pipeline. With ``progress_key``, values a
    task publishes with :func:`durapipe.progress` appear in ``state[progress_key]`` for the
    nodes after the dispatch. ``max_tasks`` bounds how many of the tasks run at once;
    ``queue`` puts them on a named DBOS queue any worker process of the app can dequeue.
    ``detach=True`` makes tasks that outlive the run: never joined (a ``join`` cannot name
    them, and the run's end does not wait for them), listed as detached in
    ``durapipe.background_tasks``, and cancelled by name with ``handle.cancel_task(name)``
    or ``durapipe cancel RUN --task NAME``.

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
    if not isinstance(detach, bool):
        raise BuildError(f"{owner}: detach must be True or False, got {detach!r}")
    if detach and progress_key is not None:
        raise BuildError(f"{owner}: a detached task is never joined, so progress_key has no "
                         "node to publish to; read its progress from the run's events instead")
    return Dispatch(tasks, labels, on_complete, on_error, progress_key,
                    _positive_int(max_tasks, "max_tasks", owner), queue, detach)


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


def _positive(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 or x != x or x == float("inf"):
        raise BuildError(f"{what}: {x!r} is not a number of seconds > 0")
    return float(x)


def until(pred: Callable[[dict[str, Any]], Any], max: int = 10) -> Until:
    """Loop condition: ``node * until(lambda s: s["score"] > 0.8, max=5)``.

    ``pred(state)`` is checked after each pass; the loop stops when it holds or after
    ``max`` passes. It runs again on every replay, so it must be a pure function of state.
    """
    return Until(pred, max)


def route(
    key_or_fn: str | Callable[[dict[str, Any]], Any],
    branches: Mapping[Any, Any],
    default: Any = None,
) -> Route:
    """Pick one branch by a state value: ``route("lang", {"en": en, "fr": fr}, default=other)``.

    ``key_or_fn`` is a state key or a function of state. The first branch whose value
    equals it runs; with no match the default runs, or nothing (the audit records the skip).
    """
    if isinstance(key_or_fn, str):
        if not key_or_fn:
            raise BuildError("route(''): the selector must be a state key or a function of state")
    else:
        _check_fn(key_or_fn, "route")
    if not isinstance(branches, Mapping) or not branches:
        raise BuildError(f"route({key_or_fn!r}, ...): give a non-empty dict {{value: node}}")
    pairs: list[tuple[Any, Node]] = []
    for value, node in branches.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise BuildError(
                f"route({key_or_fn!r}): branch value {value!r} must be a str, number, bool or None"
            )
        pairs.append((value, as_node(node, f"route branch {value!r}")))
    dflt = as_node(default, "route default") if default is not None else None
    return Route(key_or_fn, tuple(pairs), dflt)


def patched(name: str, *, new: Any, old: Any) -> Patched:
    """Change a node without changing it for runs already in flight.

    ``patched("tone-v2", new=fn(polite), old=fn(blunt))``: a run started by a pipeline
    that has this marker takes ``new``; a run recorded by an older shape (one without a
    marker of this name) takes ``old`` when it reaches the node, whichever code runs it.
    Keep the marker until no run of the older shape is left (``durapipe versions``).
    """
    if not isinstance(name, str) or not name.strip():
        raise BuildError(f"patched({name!r}, ...): the marker name must be a non-empty string")
    return Patched(name, as_node(new, f"patched({name!r}) new"), as_node(old, f"patched({name!r}) old"))


def race(*nodes: Any) -> Race:
    """Run every branch; the first to succeed wins, the others are cancelled.

    Only the winner's writes reach state; when all fail the error lists each branch's.
    """
    if len(nodes) < 2:
        raise BuildError(f"race(...) needs at least two branches, got {len(nodes)}")
    return Race(tuple(as_node(n, f"race branch {i}") for i, n in enumerate(nodes)))


def map_over(
    items_key: str,
    node: Any,
    output_key: str,
    concurrency: int | None = None,
    item_key: str = "item",
    errors: str = "raise",
    errors_key: str | None = None,
) -> MapOver:
    """Run ``node`` once per item of the list ``state[items_key]``; results go to ``output_key``.

    Each execution sees its item in ``state[item_key]``. Results are in input order: the
    value of the key the node writes (an Agent's key, or ``fn(..., writes=[k])``), else its
    whole updates dict. ``concurrency`` bounds how many items run at once.

    ``errors="raise"`` (the default) fails the map at the first failed item and cancels the
    rest. ``errors="collect"`` lets every item finish: a failed item leaves ``None`` at its
    place in ``output_key`` and a record ``{"index", "item", "node", "error", "type"}`` in
    ``state[errors_key]`` (default ``<output_key>_errors``; ``[]`` when none failed).
    """
    for what, key in (("items_key", items_key), ("output_key", output_key), ("item_key", item_key)):
        if not isinstance(key, str) or not key:
            raise BuildError(f"map_over(): {what} must be a non-empty state key, got {key!r}")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise BuildError(f"map_over({items_key!r}): concurrency must be an int >= 1 or None")
    _errors_mode(errors, errors_key, f"map_over({items_key!r})")
    return MapOver(items_key, as_node(node, f"map_over({items_key!r}) body"), output_key,
                   concurrency, item_key, errors, errors_key)


def _errors_mode(errors: Any, errors_key: Any, owner: str) -> None:
    if errors not in ("raise", "collect"):
        raise BuildError(f"{owner}: errors must be 'raise' (fail at the first failure) or "
                         f"'collect' (keep going, record failures), got {errors!r}")
    if errors_key is not None and (not isinstance(errors_key, str) or not errors_key):
        raise BuildError(f"{owner}: errors_key must be a non-empty state key, got {errors_key!r}")
    if errors_key is not None and errors != "collect":
        raise BuildError(f"{owner}: errors_key={errors_key!r} is only used with errors='collect'")


def parallel(*nodes: Any, errors: str = "raise", errors_key: str | None = None) -> Parallel:
    """``parallel(a, b, c)`` is ``a | b | c``; ``errors="collect"`` keeps it going when a
    branch fails.

    With ``errors="collect"`` every branch runs to its end; the writes of the branches that
    succeeded are merged as with ``|``, a failed branch writes nothing, and
    ``state[errors_key]`` (default ``"errors"``) lists each failure as
    ``{"branch", "node", "error", "type"}`` (``[]`` when none failed).
    """
    if len(nodes) < 2:
        raise BuildError(f"parallel(...) needs at least two branches, got {len(nodes)}")
    _errors_mode(errors, errors_key, "parallel(...)")
    branches = tuple(as_node(n, f"parallel branch {i}") for i, n in enumerate(nodes))
    if errors == "raise":
        return Parallel(branches)
    return Parallel(branches, errors, errors_key or "errors")


def sleep(seconds: float) -> Sleep:
    """A durable sleep: a restart does not reset it."""
    return Sleep(_positive(seconds, "sleep()"))


def gate(
    name: str,
    message: str,
    when: Callable[[dict[str, Any]], Any] | None = None,
    timeout: float | None = None,
    approvers: Iterable[str] | None = None,
    on_timeout: str = "reject",
) -> Gate:
    """Human approval: the run waits until ``app.approve(run_id, name, by=...)`` or ``app.reject``.

    ``message`` is filled from state (``{key}``). ``when(state)`` false skips the gate.
    ``approvers`` limits who may answer. Past ``timeout`` seconds, ``on_timeout`` decides:
    "reject" (GateRejected), "approve", or "fail" (NodeTimeout). The decision lands in
    ``state[name]``; a rejection raises GateRejected unless handled, as in ``gate(...) // plan_b``.
    """
    if not isinstance(name, str) or not name:
        raise BuildError(f"gate({name!r}): the name must be a non-empty string (it is also the state key)")
    if not isinstance(message, str):
        raise BuildError(f"gate {name!r}: the message must be a string")
    template_keys(message)
    if when is not None:
        _check_fn(when, f"gate {name!r} when=")
    secs = _positive(timeout, f"gate {name!r} timeout=") if timeout is not None else None
    who = _keys(approvers, "approvers", f"gate {name!r}")
    if who is not None and not who:
        raise BuildError(f"gate {name!r}: approvers=[] would let nobody answer; name at least one")
    if on_timeout not in ("reject", "approve", "fail"):
        raise BuildError(f"gate {name!r}: on_timeout must be 'reject', 'approve' or 'fail', got {on_timeout!r}")
    return Gate(name, message, when, secs, who, on_timeout)


def limit(key: str, node: Any = None, concurrency: int | None = None, *,
          adaptive: bool = False) -> Any:
    """At most ``concurrency`` executions of ``node`` (and of every node limited by the
    same ``key``) run at once, across all runs and worker processes of the app.

    ``limit("gemini", writer, concurrency=4)``, or ``limit("gemini", concurrency=4)`` (also
    ``limit("gemini", 4)``) as a wrapper to apply to nodes: ``limit("gemini", 4)(writer)``. ``adaptive=True`` halves the limit when a step inside
    fails with 429, 5xx or a timeout, and raises it by one per window of successes, never
    above ``concurrency``. ``node.concurrency(n)`` is ``limit(node's name, node, ...)``.
    """
    if not isinstance(key, str) or not key.strip() or "\n" in key or "\x00" in key:
        raise BuildError(f"limit({key!r}, ...): the key must be a non-empty one-line string, "
                         "e.g. limit('gemini', node, concurrency=4)")
    if isinstance(node, int) and not isinstance(node, bool) and concurrency is None:
        node, concurrency = None, node  # limit("gemini", 4)
    n = check_limit(concurrency, adaptive, f"limit({key!r}, concurrency=...)")
    if node is None:
        return LimitWrapper(key, n, adaptive)
    return Limit(as_node(node, f"limit({key!r})"), key, n, adaptive)


class LimitWrapper:
    """``limit(key, concurrency=n)``: call it on a node to limit that node."""

    wraps_nodes = True

    def __init__(self, key: str, n: int, adaptive: bool) -> None:
        self.key, self.n, self.adaptive = key, n, adaptive

    def __repr__(self) -> str:
        return f"limit({self.key!r}, concurrency={self.n}, adaptive={self.adaptive})"

    def __call__(self, node: Any) -> Limit:
        return Limit(as_node(node, f"limit({self.key!r})"), self.key, self.n, self.adaptive)
