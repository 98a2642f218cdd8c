"""Retry policies: ``fn(f, retry=Retry(...))``, ``Agent(...).retry(Retry(...))``,
``Step(..., retry=Retry(...))``.

Each attempt is durable: it runs at a path of its own (attempt 2 of the node at ``0.1``
runs at ``0.1#1``, so its steps are rows of their own), and each failed attempt records a
step ``<attempt path>:retry`` holding the error, the decision (retry or give up) and the
time the next attempt may start. A crash between attempts resumes the count where it
stopped: finished attempts are never run again, and the backoff waits only for what is
left of it.

>>> Retry(attempts=5, backoff=0.5, max_interval=30, jitter=0.1, retry_on=(TimeoutError,))
Retry(attempts=5, backoff=0.5, max_interval=30.0, jitter=0.1, retry_on=('TimeoutError',), give_up_on=())

Defaults per node kind (without a ``Retry``): a plain function runs once (it may have
side effects, so retrying it is the author's choice); a model call retries transient
provider errors (429, 5xx, timeouts) inside its request, with backoff and jitter
(``GeminiModel``); a ``Step`` takes its node's policy.

``fn(f, retries=n)``, ``Agent(...).retries(n)`` and ``Step(..., retries=n)`` are the short
form of the same mechanism: ``Retry(attempts=n + 1, backoff=0.5)`` (see :func:`from_retries`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import BuildError

# Errors a policy never retries unless it names them in retry_on: they say the pipeline or
# its state is wrong, or that a person or an operator stopped the run, so another attempt
# would fail alike.
NEVER_RETRIED = ("BuildError", "PlanError", "StateError", "GateRejected", "RunCancelled",
                 "PipelineChanged", "RunTimeout", "BudgetExceeded")

# The short form's first wait, in seconds: what DBOS's in-step retries waited, which
# ``retries=n`` meant before it became a durable policy.
SHORT_FORM_BACKOFF = 0.5


def _names(arg: Any, what: str) -> tuple[str, ...]:
    if arg is None:
        return ()
    items: Iterable[Any] = arg if isinstance(arg, (tuple, list, set, frozenset)) else (arg,)
    out: list[str] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, BaseException):
            out.append(item.__name__)
        elif isinstance(item, str) and item:
            out.append(item)
        else:
            raise BuildError(
                f"Retry({what}={arg!r}): give exception classes (or their names), "
                f"as in {what}=(TimeoutError, ConnectionError); {item!r} is neither"
            )
    return tuple(out)


def _number(value: Any, what: str, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise BuildError(f"Retry({what}={value!r}): {what} must be a number")
    if value < low or (high is not None and value > high):
        bound = f">= {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise BuildError(f"Retry({what}={value!r}): {what} must be {bound}")
    return float(value)


@dataclass(frozen=True, init=False)
class Retry:
    """How often and when a node is tried again.

    ``attempts``: total tries (>= 1). ``backoff``: seconds before the second attempt,
    doubled for each one after, capped at ``max_interval``. ``jitter``: a fraction (0-1)
    of each wait added or removed, the same in every replay of the run. ``retry_on``:
    the error classes that are retried (default: any error except those in
    :data:`NEVER_RETRIED`); ``give_up_on``: classes that are never retried (checked
    first). Classes match by class or base class name, so a recorded error matches after a
    restart as it did before.
    """

    attempts: int
    backoff: float
    max_interval: float
    jitter: float
    retry_on: tuple[str, ...]
    give_up_on: tuple[str, ...]

    def __init__(self, attempts: int = 3, backoff: float = 1.0, max_interval: float = 60.0,
                 jitter: float = 0.1, retry_on: Any = None, give_up_on: Any = None) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise BuildError(f"Retry(attempts={attempts!r}): attempts must be an int >= 1 "
                             "(1 means no retry)")
        object.__setattr__(self, "attempts", attempts)
        object.__setattr__(self, "backoff", _number(backoff, "backoff", 0.0))
        object.__setattr__(self, "max_interval", _number(max_interval, "max_interval", 0.0))
        object.__setattr__(self, "jitter", _number(jitter, "jitter", 0.0, 1.0))
        object.__setattr__(self, "retry_on", _names(retry_on, "retry_on"))
        object.__setattr__(self, "give_up_on", _names(give_up_on, "give_up_on"))

    def shape(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "backoff": self.backoff,
                "max_interval": self.max_interval, "jitter": self.jitter,
                "retry_on": list(self.retry_on), "give_up_on": list(self.give_up_on)}

    def delay(self, attempt: int, seed: str) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based); the jitter is drawn
        from ``seed`` (run and node path), so it is the same in every process."""
        base = min(self.backoff * (2.0 ** attempt), self.max_interval)
        if not self.jitter or not base:
            return base
        digest = hashlib.sha256(f"{seed}#{attempt}".encode()).digest()
        unit = int.from_bytes(digest[:8], "big") / 2**64  # in [0, 1)
        return max(0.0, base * (1.0 + self.jitter * (2.0 * unit - 1.0)))

    def retries(self, type_names: Iterable[str]) -> bool:
        """Whether an error whose class and base classes are ``type_names`` is retried."""
        names = set(type_names)
        if names & set(self.give_up_on):
            return False
        if self.retry_on:
            return bool(names & set(self.retry_on))
        return not names & set(NEVER_RETRIED)


def from_retries(n: int) -> Retry | None:
    """The policy ``retries=n`` stands for: ``Retry(attempts=n + 1, backoff=0.5)``; None for 0."""
    return Retry(attempts=n + 1, backoff=SHORT_FORM_BACKOFF) if n else None


def policy_of(node: Any) -> Retry | None:
    """The retry policy a node runs under: its ``Retry`` if it has one, else the one its
    ``retries=n`` stands for (kept as a count in the node's shape, so pipelines registered
    with ``retries=`` keep their version), else None (the node runs once)."""
    policy = getattr(node, "retry_policy", None)
    if isinstance(policy, Retry):
        return policy
    count = getattr(node, "max_retries", 0)
    return from_retries(count) if isinstance(count, int) else None


def as_retry(value: Any, owner: str) -> Retry | None:
    """``retry=`` of a builder: a Retry, or None."""
    if value is None or isinstance(value, Retry):
        return value
    raise BuildError(f"{owner}: retry= takes Retry(attempts=..., backoff=...), got {value!r}")


__all__ = ["NEVER_RETRIED", "SHORT_FORM_BACKOFF", "Retry", "as_retry", "from_retries", "policy_of"]
