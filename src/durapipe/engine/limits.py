"""The ``limit`` node: run its body while holding one of the key's slots (see :mod:`.slots`).

The body runs inline in the workflow (no child workflow, no DBOS operation of its own), so
a limit changes neither the steps nor their numbers. The slot is taken before the body
starts and given back when it ends: as done when the body succeeded (a replay of the run
then answers the body's recorded steps without waiting for a slot), deleted otherwise (a
body stopped by a crash, a cancel or a shutdown takes a slot again when its run resumes).
"""

from __future__ import annotations

import asyncio

from dbos import DBOS

from ..ir import Limit
from ..state import State
from .context import RunContext
from .slots import Guard, guarding, is_overload, unguard


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
        await limiter.release(slot, done)
        await guard.settle()
