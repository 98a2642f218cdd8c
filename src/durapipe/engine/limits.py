"""The ``limit`` node: run its body while holding one of the key's slots (see :mod:`.slots`).

The body runs inline in the workflow (no child workflow, no DBOS operation of its own), so
a limit changes neither the steps nor their numbers. The slot is taken before the body
starts and given back when it ends: as done when the body succeeded (a replay of the run
then answers the body's recorded steps without waiting for a slot), deleted otherwise (a
body stopped by a crash, a cancel or a shutdown takes a slot again when its run resumes).
"""

from __future__ import annotations

import asyncio
import logging

from dbos import DBOS

from ..errors import error_text
from ..ir import Limit
from ..state import State
from .context import RunContext
from .slots import Guard, guarding, is_overload, unguard

log = logging.getLogger("durapipe")


async def run_limit(ctx: RunContext, node: Limit, path: str, state: State) -> State:
    limiter = ctx.app.limiter
    workflow_id = DBOS.workflow_id or ctx.root
    body_path = f"{path}.0"
    slot = await limiter.acquire(node.key, f"{workflow_id}/{path}", workflow_id)
    if slot is None:  # finished before: its steps are recorded, replay them
        return await ctx.execute(node.body, body_path, state)
    guard = Guard(limiter, limiter.spec(node.key), slot, asyncio.get_running_loop())
    token = guarding(guard)
    done = False
    try:
        out = await ctx.execute(node.body, body_path, state)
        done = True
        return out
    except Exception as exc:
        if node.adaptive and not guard.overloaded and is_overload(exc):
            guard.report(exc)  # e.g. a timeout around the steps, which saw no error
        raise
    finally:
        unguard(token)
        try:
            await limiter.release(slot, done)
            await guard.settle()
        except Exception as exc:  # e.g. the app is stopping: the slot's lease runs out
            log.warning("durapipe: node %s: could not give back its slot of limit %r (%s); "
                        "it is freed when its lease runs out", path, node.key, error_text(exc))
