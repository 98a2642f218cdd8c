"""Durable retries: each attempt of a node at a path of its own, each failure recorded.

Attempt ``k`` (0-based) of the node at ``0.1`` runs at ``0.1`` for ``k == 0`` and at
``0.1#k`` after that, so the steps of every attempt are rows of their own. When an attempt
fails, one step ``<attempt path>:retry`` records the error, whether the policy retries it
and when the next attempt may start (``wake_at``). A replay answers each finished attempt
and each decision from those rows: a crash between attempts resumes the count, waits only
for what is left of the backoff, and never runs a finished attempt again. Nothing is
written for an attempt that succeeds beyond its own steps.

The decision is taken once, with the error in hand (its class and base classes), and read
back afterwards, so a replay decides alike even where the recorded error has lost its class.

``retries=n`` (on ``fn``, ``Agent`` and ``Step``) runs here too, as ``Retry(attempts=n + 1,
backoff=0.5)``. It used to mean DBOS's retries inside one step; a node with a count has a
new shape since (``_ir_core.RETRY_COUNT``), so a run recorded under the old meaning is never
replayed here past such a node: it waits for a worker with its own shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dbos._error import DBOSException

from ..errors import (
    DurapipeError,
    ModelError,
    NodeFailed,
    PipelineChanged,
    RunCancelled,
    error_text,
    from_portable,
)
from ..ir import Node
from ..retry import Retry, policy_of
from ..state import State
from . import events
from .context import Handler, RunContext, node_error, run_step

log = logging.getLogger("durapipe")


def attempt_path(path: str, attempt: int) -> str:
    return path if attempt == 0 else f"{path}#{attempt}"


def _root_error(exc: BaseException) -> BaseException:
    """The error the node's own code raised, under the NodeFailed wrappers around it."""
    seen = 0
    while isinstance(exc, NodeFailed) and exc.__cause__ is not None and seen < 20:
        exc, seen = exc.__cause__, seen + 1
    errors = getattr(exc, "errors", None)  # DBOS's "out of step retries": its last error
    if isinstance(errors, list) and errors and isinstance(errors[-1], BaseException):
        exc = errors[-1]
    return from_portable(exc)


def _type_names(exc: BaseException) -> list[str]:
    name = getattr(exc, "name", None)
    if type(exc).__name__ == "PortableWorkflowError" and isinstance(name, str):
        return [name, "Exception"]  # a recorded foreign error: only its class name is known
    return [c.__name__ for c in type(exc).__mro__]


def _refused(exc: BaseException) -> bool:
    """A model's refusal: a ModelError with an HTTP 4xx status other than 408 and 429."""
    code = exc.data.get("status_code") if isinstance(exc, ModelError) else None
    return isinstance(code, int) and 400 <= code < 500 and code not in (408, 429)


def decide(policy: Retry, exc: BaseException) -> bool:
    """Whether ``exc`` (a failed attempt's error) is retried under ``policy``."""
    if isinstance(exc, DBOSException):  # cancelled, diverged replay, conflict: never
        return False
    if not isinstance(exc, Exception):
        return False
    root = _root_error(exc)
    if isinstance(root, DBOSException):
        return False
    if _refused(root) and "ModelError" not in policy.retry_on:
        return False  # the provider refused this request (a 4xx): it would refuse it again
    names = _type_names(root)
    if root is not exc:
        names += [n for n in _type_names(exc) if n not in names and n != "NodeFailed"]
    return policy.retries(names)


async def run_attempts(ctx: RunContext, policy: Retry, path: str, label: str,
                       attempt: Callable[[str], Awaitable[State]]) -> State:
    """Run ``attempt(attempt_path)`` until it succeeds or ``policy`` gives up."""
    for k in range(policy.attempts):
        apath = attempt_path(path, k)
        try:
            return await attempt(apath)
        except Exception as exc:
            if _passes_through(exc):
                raise  # the run stops or parks here: nothing to record, nothing to retry
            where = f"{apath}:{label}"
            err = node_error(exc, where)
            last = k + 1 == policy.attempts
            retry = (not last) and decide(policy, exc)
            delay = policy.delay(k, f"{ctx.root}/{path}") if retry else 0.0
            record = {"attempt": k + 1, "of": policy.attempts, "retry": retry,
                      "error": error_text(_root_error(err)), "delay": round(delay, 3)}

            def note(record: dict[str, Any] = record, delay: float = delay) -> dict[str, Any]:
                return {**record, "wake_at": time.time() + delay}
            decided: dict[str, Any] = await run_step(f"{apath}:retry", 0, note)
            if not decided.get("retry"):
                raise _given_up(err, path, label, k + 1, policy.attempts) from exc
            # Once per attempt, also on a replay (keyed): the node runs again at attempt k + 2.
            events.emit("retry", path=path, name=label, kind="node", key=f"retry:{apath}",
                        data={"attempt": k + 2, "of": policy.attempts,
                              "error": record["error"], "delay": decided["delay"]})
            log.warning("node %s failed (attempt %d of %d), retrying in %.2fs: %s",
                        f"{path}:{label}", k + 1, policy.attempts, decided["delay"],
                        error_text(err))
            wait = float(decided["wake_at"]) - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _passes_through(exc: BaseException) -> bool:
    """Errors that are not a failed attempt: a diverged replay, a cancel, a changed pipeline."""
    return isinstance(exc, DBOSException) or isinstance(from_portable(exc), (PipelineChanged,
                                                                               RunCancelled))


def _given_up(err: BaseException, path: str, label: str, made: int, allowed: int) -> BaseException:
    if not isinstance(err, DurapipeError):
        return err
    why = "out of attempts" if made == allowed else "its error is not retried"
    return type(err)(f"{err.message} (node {path}:{label} gave up after {made} of {allowed} "
                     f"attempts: {why})", **{**err.data, "attempts": made})


def retrying(handler: Handler) -> Handler:
    """``handler`` for nodes that may carry a retry policy (fn, agent): ``retry=Retry(...)``
    or its short form ``retries=n``."""

    async def run(ctx: RunContext, node: Node, path: str, state: State) -> State:
        policy = policy_of(node)
        if policy is None or policy.attempts == 1:
            return await handler(ctx, node, path, state)
        return await run_attempts(ctx, policy, path, node.label,
                                  lambda apath: handler(ctx, node, apath, state))

    run.__name__ = getattr(handler, "__name__", "run")
    run.__doc__ = handler.__doc__
    return run


__all__ = ["attempt_path", "decide", "retrying", "run_attempts"]
