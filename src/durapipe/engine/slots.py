"""Concurrency limits across runs and workers: slots in Postgres, woken by LISTEN/NOTIFY.

``limit(key, node, concurrency=n)`` (or ``node.concurrency(n)``) lets at most ``n``
executions of the nodes sharing ``key`` run at once in the whole app. On Postgres a slot
is a row of ``durapipe.limit_slots``; taking one is one short transaction that locks the
key's row of ``durapipe.limits`` and counts the slots held, so every process of the app
sees one bound. A slot is held while

- it is not released, and
- its lease has not run out (the holding process renews the leases of its slots every
  ``LEASE_SECONDS / 3``; a SIGKILLed holder stops renewing), and
- its run is still unfinished (a cancelled or failed run holds nothing).

Releasing a slot notifies ``durapipe_limits``; waiters listen on one connection per
process and try again at once, and in any case every ``POLL_SECONDS`` (for leases that
ran out). A slot is named by its holder, ``<workflow id>/<node path>``: a recovered run
takes its own slot back, and a node that finished before a crash (its slot released as
done) replays its recorded steps without waiting for a slot.

``adaptive=True`` runs additive-increase/multiplicative-decrease on the key's limit: each
step inside the node that fails with 429, 5xx or a timeout halves it (at least 1; once per
window: only a slot taken since the last decrease lowers it again), each step that
succeeds adds ``1 / limit`` (one whole slot per window of successes), never above ``n``.
Every change of the whole limit is a row of ``durapipe.limit_changes``; the view
``durapipe.limit_status`` shows each key's bound, limit and slots in use.

On SQLite (one process) the same limits and changes live in the process: slots are
counters, and ``App.limits()`` / ``App.limit_changes(key)`` report them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import BuildError, DurapipeError, error_text
from ..ir import Limit, Node
from ..models.base import listen_for_overloads, stop_listening

log = logging.getLogger("durapipe")

LEASE_SECONDS = float(os.environ.get("DURAPIPE_LIMIT_LEASE", "15"))
POLL_SECONDS = 1.0
CHANNEL = "durapipe_limits"
OVERLOAD_STATUS = frozenset({408, 429, *range(500, 600)})


def snap(x: float) -> float:
    """``x`` with float error around a whole number removed (3 + 1/3 + 1/3 + 1/3 is 4)."""
    return float(round(x)) if abs(x - round(x)) < 1e-6 else x


@dataclass(frozen=True)
class Spec:
    key: str
    n: int
    adaptive: bool


def specs_of(nodes: Iterable[tuple[str, Node]], known: dict[str, Spec] | None = None,
             pipeline: str = "") -> dict[str, Spec]:
    """The limits declared by ``nodes`` (path, node), added to ``known``; a key declared
    twice with another bound or mode is a BuildError naming both."""
    out = dict(known or {})
    for path, node in nodes:
        if not isinstance(node, Limit):
            continue
        spec = Spec(node.key, node.n, node.adaptive)
        seen = out.get(node.key)
        if seen is not None and seen != spec:
            raise BuildError(
                f"pipeline {pipeline!r} node {path}:{node.label}: limit key {node.key!r} is "
                f"already declared with concurrency={seen.n}, adaptive={seen.adaptive}, here "
                f"concurrency={node.n}, adaptive={node.adaptive}; one key has one bound, so "
                "use the same values or another key", path=path, key=node.key)
        out[node.key] = spec
    return out


# -- overload signals ---------------------------------------------------------------------

def is_overload(exc: BaseException | None) -> bool:
    """Whether an error says the provider is overloaded: HTTP 408/429/5xx (``status_code``,
    ``code``, ``status`` or ``response.status_code``), a timeout, or a model that gave up
    retrying such answers."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TimeoutError) or type(exc).__name__ in ("NodeTimeout", "RunTimeout"):
            return True
        data = getattr(exc, "__dict__", {}).get("data")
        values = [getattr(getattr(exc, "response", None), "status_code", None)]
        if isinstance(data, dict):
            values += [data.get("status_code"), data.get("code")]
            cause = data.get("cause")
            if isinstance(cause, str) and (cause.startswith("HTTP") or "Timeout" in cause):
                values.append(429 if "429" in cause else 500 if cause.startswith("HTTP 5") else 408
                              if "Timeout" in cause else None)
        else:
            values += [getattr(exc, "status_code", None), getattr(exc, "code", None),
                       getattr(exc, "status", None)]
        if any(isinstance(v, int) and not isinstance(v, bool) and v in OVERLOAD_STATUS
               for v in values):
            return True
        nested = getattr(exc, "errors", None)  # DBOS's max-retries error keeps each attempt's
        if isinstance(nested, list) and nested and isinstance(nested[-1], BaseException):
            exc = nested[-1]
            continue
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class Guard:
    """One held slot, for the steps inside the limited node to report their outcomes."""

    limiter: Limiter
    spec: Spec
    slot: Slot
    loop: asyncio.AbstractEventLoop
    overloaded: bool = False
    tasks: set[asyncio.Future[Any]] = field(default_factory=set)

    def report(self, exc: BaseException | None) -> None:
        """Record one outcome (None: success); callable from any thread."""
        if exc is not None and not is_overload(exc):
            return
        over = exc is not None
        self.overloaded = self.overloaded or over
        why = "" if exc is None else error_text(exc)
        self.loop.call_soon_threadsafe(self._start, over, why)

    def _start(self, over: bool, why: str) -> None:
        task = asyncio.ensure_future(self.limiter.observe(self.spec, self.slot, over, why))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("durapipe: limit %r: could not record an outcome: %s",
                        self.spec.key, error_text(task.exception()))  # type: ignore[arg-type]

    async def settle(self) -> None:
        """Wait for the outcomes reported so far to be recorded."""
        await asyncio.sleep(0)  # outcomes reported from a step's thread start first
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)


_guards: contextvars.ContextVar[tuple[Guard, ...]] = contextvars.ContextVar(
    "durapipe_limit_guards", default=())


def guarding(guard: Guard) -> contextvars.Token[tuple[Guard, ...]]:
    return _guards.set((*_guards.get(), guard))


def unguard(token: contextvars.Token[tuple[Guard, ...]]) -> None:
    _guards.reset(token)


def observing(body: Callable[[], Any]) -> Callable[[], Any]:
    """``body`` reporting each attempt's outcome to the adaptive limits around it."""
    guards = tuple(g for g in _guards.get() if g.spec.adaptive)
    if not guards:
        return body

    def report(exc: BaseException | None) -> None:
        for g in guards:
            g.report(exc)

    def retried(why: str) -> None:  # a model client retrying an overload by itself
        for g in guards:
            g.report(RetriedOverload(why))

    @contextlib.contextmanager
    def reporting() -> Iterator[None]:
        token = listen_for_overloads(retried)
        try:
            yield
        except Exception as exc:
            report(exc)
            raise
        finally:
            stop_listening(token)
        report(None)

    if inspect.iscoroutinefunction(body):
        async def run_async() -> Any:
            with reporting():
                return await body()
        return run_async

    def run() -> Any:
        with reporting():
            return body()
    return run


class RetriedOverload(TimeoutError):
    """An overload a model client answered with a retry of its own (see
    ``durapipe.models.base.report_overload``)."""


# -- limiters ------------------------------------------------------------------------------

@dataclass
class Slot:
    key: str
    holder: str
    acquired: float  # seconds since the epoch (the database's clock on Postgres)


class Limiter:
    """Slots of the launched app; :class:`PgLimiter` on Postgres, this one in-process."""

    def __init__(self, app_name: str, specs: dict[str, Spec]) -> None:
        self.app = app_name
        self.specs = dict(specs)
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()
        # In-process state (the SQLite limiter): holders, limits, last decrease, changes.
        self._held: dict[str, dict[str, Slot]] = {k: {} for k in specs}
        self._done: set[str] = set()
        self._limit: dict[str, float] = {k: float(s.n) for k, s in specs.items()}
        self._decreased: dict[str, float] = {}
        self.changes: list[dict[str, Any]] = []

    def spec(self, key: str) -> Spec:
        spec = self.specs.get(key)
        if spec is None:
            raise DurapipeError(f"limit key {key!r} is not declared by any pipeline of app "
                                f"{self.app!r}", key=key)
        return spec

    async def acquire(self, key: str, holder: str, workflow_id: str) -> Slot | None:
        """Wait for a slot of ``key``; None when ``holder`` already finished (a replay)."""
        while True:
            event = self._waiter(key)
            try:
                got = await self._try(key, holder, workflow_id)
                if got is None or isinstance(got, Slot):
                    return got
                try:
                    await asyncio.wait_for(event.wait(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
            finally:
                with self._lock:
                    waiting = self._waiters.get(key, [])
                    mine = [w for w in waiting if w[1] is event]
                    for w in mine:
                        waiting.remove(w)

    def _waiter(self, key: str) -> asyncio.Event:
        event = asyncio.Event()
        with self._lock:
            self._waiters.setdefault(key, []).append((asyncio.get_running_loop(), event))
        return event

    def wake(self, key: str, every: bool = False) -> None:
        """Wake the longest waiting waiter of ``key`` (``every``: all); from any thread.

        One slot given back wakes one waiter per process, in the order they came; a wake
        that reaches no one is made up by the waiters' own look every ``POLL_SECONDS``."""
        with self._lock:
            waiting = self._waiters.get(key, [])
            woken = list(waiting) if every else waiting[:1]
            del waiting[:len(woken)]
        for loop, event in woken:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    async def _try(self, key: str, holder: str, workflow_id: str) -> Slot | None | bool:
        if holder in self._done:
            return None
        held = self._held[key]
        if holder in held or len(held) < max(1, int(self._limit[key])):
            slot = held[holder] = Slot(key, holder, time.time())
            return slot
        return False

    async def release(self, slot: Slot, done: bool) -> None:
        """Give the slot back; ``done``: the node finished, so a replay needs no slot."""
        self._held[slot.key].pop(slot.holder, None)
        if done:
            self._done.add(slot.holder)
        self.wake(slot.key)

    async def observe(self, spec: Spec, slot: Slot, overloaded: bool, why: str) -> None:
        was = self._limit[spec.key]
        if overloaded:
            if slot.acquired < self._decreased.get(spec.key, 0.0):
                return
            now = max(1.0, float(int(was) // 2))
            self._decreased[spec.key] = time.time()
        else:
            now = min(float(spec.n), snap(was + 1.0 / max(1, int(was))))
        self._limit[spec.key] = now
        if int(now) != int(was):
            self._changed(spec.key, int(was), int(now), why or "success", slot.holder)
            if now > was:
                self.wake(spec.key, every=True)

    def _changed(self, key: str, was: int, now: int, reason: str, holder: str) -> None:
        self.changes.append({"key": key, "at": time.time(), "old_limit": was,
                             "new_limit": now, "reason": reason, "holder": holder})
        log.info("durapipe: limit %r %d -> %d (%s)", key, was, now, reason)

    def changes_of(self, key: str) -> list[dict[str, Any]]:
        """The changes of ``key``'s whole limit, oldest first."""
        return [c for c in self.changes if c["key"] == key]

    def status(self) -> list[dict[str, Any]]:
        """Per key: the bound, the limit in force and the slots in use."""
        return [{"key": k, "concurrency": s.n, "adaptive": s.adaptive,
                 "limit": max(1, int(self._limit[k])), "in_use": len(self._held[k])}
                for k, s in sorted(self.specs.items())]

    def close(self) -> None:
        with self._lock:
            keys = list(self._waiters)
        for key in keys:
            self.wake(key, every=True)

