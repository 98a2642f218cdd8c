"""Structured concurrency for ``a | b``, ``map_over`` and ``Flow``: the first failure cancels
the siblings still running, and the node fails at once with that error.

A sibling is either an asyncio future of this workflow (a branch running inline at
reserved step numbers, an inline map item) or the wait for a child workflow. Cancelling a
child workflow records it CANCELLED (with its own children) and stops its task here at
once; the failure's error names the cancelled siblings (``data["cancelled"]``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from dbos import DBOS

from ..errors import DurapipeError
from . import lifecycle


def failed(f: asyncio.Future[Any]) -> bool:
    return f.done() and not f.cancelled() and f.exception() is not None


async def wait_all_or_first_failure(
    futures: Sequence[asyncio.Future[Any]], children: dict[int, str], labels: list[str]
) -> tuple[int, list[str]] | None:
    """Wait for every future; at the first failure cancel the rest and return the index of
    the failed one and the labels of those cancelled. None when all succeeded.

    If this wait is itself cancelled (the run is cancelled or the app stops), the inline
    futures are cancelled with it, as ``asyncio.gather`` would.
    """
    pending = set(futures)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            bad = [i for i, f in enumerate(futures) if f in done and failed(f)]
            if bad:
                running = [j for j, f in enumerate(futures) if not f.done()]
                await cancel_siblings(futures, children, running)
                return bad[0], [labels[j] for j in running]
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return None


async def cancel_siblings(futures: Mapping[int, asyncio.Future[Any]] | Sequence[asyncio.Future[Any]],
                          children: dict[int, str], running: list[int]) -> None:
    """Cancel the running siblings ``running``: child workflows in the database and here,
    inline futures here; wait until each has stopped."""
    ids = [children[j] for j in running if j in children]
    if ids:
        await DBOS.cancel_workflows_async(ids, cancel_children=True)
        lifecycle.cancel_local(*ids)
    for j in running:
        futures[j].cancel()
    await asyncio.gather(*(futures[j] for j in running), return_exceptions=True)


def with_cancelled(exc: BaseException, cancelled: list[str]) -> BaseException:
    """The failure, its message and data naming the siblings it cancelled."""
    if not cancelled or not isinstance(exc, DurapipeError):
        return exc
    data = {**exc.data, "cancelled": cancelled}
    return type(exc)(f"{exc.message} (cancelled the running siblings: {', '.join(cancelled)})",
                     **data)
