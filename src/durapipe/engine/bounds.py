"""How much of a process's work runs at once: a bounded executor and a default width.

DBOS's executor (the default executor of the event loops it runs on) has no thread limit,
and a ``map_over`` over 10,000 items started every item at once: thousands of threads,
and the 20 connections of DBOS's pool waited on until they time out. durapipe bounds both:

- **Threads.** Sync step bodies, and the statements durapipe's steps send, run on one
  executor of ``limit()`` threads per process (:func:`to_thread`), never on
  ``asyncio.to_thread``.
- **Width.** ``map_over`` without ``concurrency=``, the branches of ``a | b`` that run
  inline and a ``dispatch`` of more tasks than that without ``max_tasks=`` run at most
  ``limit()`` items at once; ``concurrency=`` / ``max_tasks=`` still say otherwise.

``limit()`` is the size of DBOS's system database pool (``sys_db_pool_size``, 20 unless
the App's ``dbos_config`` says otherwise): as many items in flight as there are
connections for their steps.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_POOL = 20  # DBOS's own default for sys_db_pool_size
_lock = threading.Lock()
_state: dict[str, Any] = {"limit": DEFAULT_POOL, "executor": None}


def pool_size(config: Mapping[str, Any]) -> int:
    """The size of the system database pool a DBOS config asks for."""
    size = config.get("sys_db_pool_size")
    if size is None:
        size = (config.get("db_engine_kwargs") or {}).get("pool_size")
    return int(size) if size else DEFAULT_POOL


def configure(limit: int) -> None:
    """Set the process's bound (at launch); a new size gets a new executor."""
    with _lock:
        limit = max(1, int(limit))
        if limit != _state["limit"]:
            old = _state["executor"]
            _state.update(limit=limit, executor=None)
            if old is not None:
                old.shutdown(wait=False)


def limit() -> int:
    """How many items a map, an inline fan-out or a dispatch runs at once by default."""
    return int(_state["limit"])


def executor() -> ThreadPoolExecutor:
    """The process's executor for sync step bodies and step statements."""
    found = _state["executor"]
    if found is None:
        with _lock:
            found = _state["executor"]
            if found is None:
                found = ThreadPoolExecutor(max_workers=_state["limit"],
                                           thread_name_prefix="durapipe-step")
                _state["executor"] = found
    return found  # type: ignore[no-any-return]


async def to_thread(func: Callable[..., T], /, *args: Any) -> T:
    """``asyncio.to_thread`` on the bounded executor (context variables go along)."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, func, *args)
    return await loop.run_in_executor(executor(), call)
