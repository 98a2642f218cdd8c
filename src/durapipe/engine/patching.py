"""The handler of ``patched(name, new=..., old=...)``: old and new code side by side.

A run takes ``new`` when the shape it was started by has a ``patched`` marker of that name
(a run started by the current code always has), else ``old``. The choice depends on the
run's recorded shape only, so every replay of a run makes the same one, on any code that
keeps the marker. Child workflows decide by the shape of the run they belong to.
"""

from __future__ import annotations

import asyncio

from ..ir import Patched
from ..state import State
from . import versions
from .context import RunContext


async def run_shape(ctx: RunContext) -> str:
    """The shape the run ``ctx`` belongs to was started by (on SQLite: the shape this
    workflow was recorded by)."""
    found = await asyncio.to_thread(versions.started_by, ctx.root)
    return found or ctx.recorded


async def run_patched(ctx: RunContext, node: Patched, path: str, state: State) -> State:
    shape = await run_shape(ctx)
    new = shape == ctx.pipeline.version or await asyncio.to_thread(
        versions.has_marker, ctx.app.dbos_name, ctx.pipeline.name, shape, node.name)
    if new:
        return await ctx.execute(node.new, f"{path}.0", state)
    return await ctx.execute(node.old, f"{path}.1", state)
