"""Token budgets and model prices.

>>> app = App("shop", max_tokens=50_000, prices={"gemini-2.5-flash": (0.30, 2.50)})
>>> publish.start({"topic": "x"}, max_tokens=20_000)     # this run's own budget

A run's budget (``start(..., max_tokens=)``, else the app's ``max_tokens``) is recorded on
the run when it starts (attribute ``durapipe.max_tokens``). Inside every model step, before
the model is asked, :meth:`Turn.check` sums the input and output tokens of the model calls
recorded for the run and for every workflow under it (its subtrees and background tasks,
found through ``parent_workflow_id``). Once the sum has reached the budget, the step fails
with :class:`~durapipe.errors.BudgetExceeded` naming the node, the usage and the budget,
and the run fails there (no retry).

The count is what the database records, so it is the same after a crash: a model call
whose step was recorded is counted once, whatever process ran it, and a replayed run reads
recorded steps back without checking again (the check is inside the step).

A run with a budget makes its model calls one at a time, whatever runs them (``|``
branches, ``map_over`` items at any concurrency, background tasks in any worker process):
a model step takes the run's lock (:class:`Turn`) inside the step, checks, calls the
model, and lets go only once its outcome is recorded, so the next call's check counts it.
The lock is an asyncio lock per run and loop and a process lock per run: a run's subtrees
(``|``, ``map_over``) run in the process of their parent, so that covers them. A run whose
pipeline dispatches background tasks (which a queue may hand to another worker process)
also takes a Postgres advisory lock keyed by the app and the root run id, on a connection
of durapipe's own small lock pool (never DBOS's), held by one call of the run per process
at a time, during the call (none on SQLite, one process; that pool opens at most 16
connections, so a 17th such run calling at once in one process waits for one, and fails
after SQLAlchemy's 30 s pool timeout). The stop point is therefore
exact: with calls of ``t`` tokens and a budget ``B``, exactly ``ceil(B / t)`` calls are
made (each checked usage ``< B``), the next call fails, and every call after it fails
without asking the model. Which items made those calls is the order in which they reached
the lock (first come, first served). Runs without a budget take no lock and keep their
parallelism. A run without background tasks reads its usage from the database once per
process and then counts each recorded call in memory, under the lock (:class:`Turn`); one
with tasks reads it at every check.

``prices`` maps a model name to ``(input, output)`` price per million tokens; each model
step then records ``cost`` (the ``cost`` column of ``durapipe.llm_calls``).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..errors import AppStateError, BudgetExceeded
from ..ir import Dispatch, Node
from .admission import MAX_TOKENS, cached_attributes, keyed_lock_async, run_attributes, system_engine

if TYPE_CHECKING:
    from .app import App

_USAGE_SQL = """
WITH RECURSIVE tree(id) AS (
  SELECT CAST(:root AS TEXT)
  UNION ALL
  SELECT s.workflow_uuid FROM {schema}workflow_status s JOIN tree t ON s.parent_workflow_id = t.id
)
SELECT o.output FROM {schema}operation_outputs o JOIN tree t ON o.workflow_uuid = t.id
WHERE o.error IS NULL AND o.output LIKE '%input_tokens%'
"""


def check_options(app: str, max_tokens: Any, prices: Any) -> tuple[int | None, dict[str, tuple[float, float]]]:
    """The App's ``max_tokens`` and ``prices``, checked."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise AppStateError(f"App({app!r}, max_tokens={max_tokens!r}): the default token budget "
                            "of a run must be a positive int, or None", app=app)
    table: dict[str, tuple[float, float]] = {}
    for model, price in (prices or {}).items():
        ok = (isinstance(model, str) and isinstance(price, (tuple, list)) and len(price) == 2
              and all(isinstance(p, (int, float)) and not isinstance(p, bool)
                      and math.isfinite(p) and p >= 0 for p in price))
        if not ok:
            raise AppStateError(
                f"App({app!r}, prices=...): entry {model!r}: {price!r} must be model name -> "
                "(input, output) price per million tokens, as {'gemini-2.5-flash': (0.3, 2.5)}",
                app=app)
        table[model] = (float(price[0]), float(price[1]))
    return max_tokens, table


def usage(app: App, root: str) -> int:
    """Input plus output tokens of the model calls recorded for run ``root`` and every
    workflow under it."""
    schema = "" if app.database_url.startswith("sqlite") else \
        f"{app.dbos_config().get('dbos_system_schema') or 'dbos'}."
    with system_engine(app).connect() as con:
        rows = con.execute(sa.text(_USAGE_SQL.format(schema=schema)), {"root": root}).all()
    total = 0
    for (raw,) in rows:
        try:
            doc = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if isinstance(doc, dict) and "agent" in doc and "turn" in doc:
            total += int(doc.get("input_tokens") or 0) + int(doc.get("output_tokens") or 0)
    return total


async def limit_of(app: App, root: str) -> int | None:
    """Run ``root``'s token budget, or None."""
    attrs = cached_attributes(root)
    if attrs is None:  # read once per run and process, off the event loop
        attrs = await asyncio.to_thread(run_attributes, app, root)
    limit = attrs.get(MAX_TOKENS)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


# Usage of budgeted runs whose every model call runs in this process (no background
# tasks), by app and run: seeded from the database at the run's first check here, then
# counted up as each call's step is recorded, always under the run's lock.
_totals: dict[str, int] = {}


class Turn:
    """One model step's hold on its run's budget lock.

    :meth:`take` is called inside the step body (after the step has its operation number,
    so waiting never changes the numbering; again on a retry, a no-op), then :meth:`check`;
    :meth:`release` after the step returned or failed, once DBOS or :mod:`.steps` recorded
    its outcome. A replayed step never calls the body, so it neither waits nor checks. A
    run without a budget takes nothing.

    A run without background tasks has all its model calls in this process, under the
    process lock, so its usage is read from the database once (at its first check in the
    process: after a crash, the recovery reads what was recorded) and then counted up by
    each call whose step was recorded; a run with tasks, which another process may run,
    reads the database at every check.
    """

    def __init__(self, app: App, root: str, pipeline: Node) -> None:
        self.app, self.root, self.pipeline = app, root, pipeline
        self.key = f"budget\x1f{app.dbos_name}\x1f{root}"
        self._held: Any = None
        self._local = False
        self._made: int | None = None

    async def take(self) -> None:
        if self._held is not None or await limit_of(self.app, self.root) is None:
            return
        # Only background tasks may run in another process (a queue's worker).
        tasks = any(isinstance(n, Dispatch) for _, n in self.pipeline.walk())
        held = keyed_lock_async(self.app, self.key, shared=tasks)
        await held.__aenter__()
        self._held, self._local = held, not tasks

    async def check(self, where: str) -> None:
        """Raise BudgetExceeded when the run has used its budget (inside the step, held)."""
        limit = await limit_of(self.app, self.root)
        if limit is None:
            return
        used = _totals.get(self.key) if self._local and self._held is not None else None
        if used is None:
            used = await asyncio.to_thread(usage, self.app, self.root)
            if self._local and self._held is not None:
                if len(_totals) > 10_000:
                    _totals.clear()
                _totals[self.key] = used
        _raise_past(limit, used, self.root, where)

    def made(self, record: dict[str, Any]) -> dict[str, Any]:
        """Note the tokens of the model call this step made (its body's result)."""
        self._made = int(record.get("input_tokens") or 0) + int(record.get("output_tokens") or 0)
        return record

    async def release(self, recorded: bool) -> None:
        """Let go of the lock; ``recorded``: the step's result was recorded."""
        held, self._held = self._held, None
        if held is None:
            return
        try:
            if self._local and self.key in _totals:
                if recorded and self._made is not None:
                    _totals[self.key] += self._made
                elif not recorded:  # what was recorded is unknown: read it again next time
                    del _totals[self.key]
        finally:
            await held.__aexit__(None, None, None)


async def check(app: App, root: str, where: str) -> None:
    """Raise BudgetExceeded when run ``root`` has used its token budget (inside the step)."""
    limit = await limit_of(app, root)
    if limit is not None:
        _raise_past(limit, await asyncio.to_thread(usage, app, root), root, where)


def _raise_past(limit: int, used: int, root: str, where: str) -> None:
    if used >= limit:
        raise BudgetExceeded(
            f"agent {where}: run {root!r} has used {used} tokens of its budget max_tokens="
            f"{limit} (input plus output tokens of every model call of the run and its "
            "background tasks), so this model call was not made; start the run with a "
            "larger max_tokens= or make it do less",
            node=where, run_id=root, used=used, max_tokens=limit,
        )


def priced(app: App, record: dict[str, Any]) -> dict[str, Any]:
    """The model step's record with its ``cost`` when the app has a price for its model."""
    price = app.prices.get(str(record.get("model"))) if app.prices else None
    if price is not None:
        tokens_in = int(record.get("input_tokens") or 0)
        tokens_out = int(record.get("output_tokens") or 0)
        record["cost"] = round((tokens_in * price[0] + tokens_out * price[1]) / 1_000_000, 10)
    return record
