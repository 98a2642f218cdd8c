"""Token budgets and model prices.

>>> app = App("shop", max_tokens=50_000, prices={"gemini-2.5-flash": (0.30, 2.50)})
>>> publish.start({"topic": "x"}, max_tokens=20_000)     # this run's own budget

A run's budget (``start(..., max_tokens=)``, else the app's ``max_tokens``) is recorded on
the run when it starts (attribute ``durapipe.max_tokens``). Inside every model step, before
the model is asked, :func:`check` sums the input and output tokens of the model calls
recorded for the run and for every workflow under it (its subtrees and background tasks,
found through ``parent_workflow_id``). Once the sum has reached the budget, the step fails
with :class:`~durapipe.errors.BudgetExceeded` naming the node, the usage and the budget,
and the run fails there (no retry).

The count is what the database records, so it is the same after a crash: a model call
whose step was recorded is counted once, whatever process ran it, and a replayed run reads
recorded steps back without checking again (the check is inside the step).

A run with a budget makes its model calls one at a time, whatever runs them (``|``
branches, ``map_over`` items at any concurrency, background tasks in any worker process):
a model step takes the run's lock (:class:`Turn`) inside the step, checks, calls the model,
and lets go only once its outcome is recorded, so the next call's check counts it. The
lock is an asyncio lock per run and loop and a process lock per run: a run's subtrees
(``|``, ``map_over``) run in the process of their parent, so that covers them. A run whose
pipeline dispatches background tasks (which a queue may hand to another worker process)
also takes a Postgres advisory lock keyed by the app and the root run id, on a connection
of durapipe's own small lock pool (never DBOS's), held by one call of the run per process
at a time, during the call (none on SQLite, one process). The stop point is therefore exact: with calls of ``t`` tokens and a
budget ``B``, exactly ``ceil(B / t)`` calls are made (each checked usage ``< B``), the next
call fails, and every call after it fails without asking the model. Which items made
those calls is the order in which they reached the lock (first come, first served). Runs
without a budget take no lock and keep their parallelism.

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


class Turn:
    """One model step's hold on its run's budget lock.

    :meth:`take` is called inside the step body (after the step has its operation number,
    so waiting never changes the numbering; again on a retry, a no-op); :meth:`release`
    after the step returned or failed, once DBOS or :mod:`.steps` recorded its outcome. A
    replayed step never calls the body, so it neither waits nor checks. A run without a
    budget takes nothing.
    """

    def __init__(self, app: App, root: str, pipeline: Node) -> None:
        self.app, self.root, self.pipeline = app, root, pipeline
        self._held: Any = None

    async def take(self) -> None:
        if self._held is not None or await limit_of(self.app, self.root) is None:
            return
        # Only background tasks may run in another process (a queue's worker).
        tasks = any(isinstance(n, Dispatch) for _, n in self.pipeline.walk())
        held = keyed_lock_async(self.app, f"budget\x1f{self.app.dbos_name}\x1f{self.root}",
                                shared=tasks)
        await held.__aenter__()
        self._held = held

    async def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await held.__aexit__(None, None, None)


async def check(app: App, root: str, where: str) -> None:
    """Raise BudgetExceeded when run ``root`` has used its token budget (inside the step)."""
    limit = await limit_of(app, root)
    if limit is None:
        return
    used = await asyncio.to_thread(usage, app, root)
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
