"""Start many runs at once: ``app.batch()`` and ``pipeline.start_many()``.

DBOS 3.4 has no public call that creates many workflows in one statement
(``DBOS.start_workflow``/``enqueue_workflow`` insert one ``workflow_status`` row each, in
their own transaction; ``send_bulk`` exists for messages only). A batch therefore does
the least database work the public API allows:

1. every item is checked first (pipeline, inputs, run id, deadline): a bad one is an
   error naming its position before anything is started;
2. repeated run ids in the batch collapse to one run (the first item's inputs), and one
   ``DBOS.list_workflows(workflow_ids=...)`` finds those that exist already; they are
   checked like ``start`` checks them and returned as they are, never started again;
3. the new runs are started together on DBOS's event loop (``start_workflow_async`` for
   each, awaited concurrently), so their inserts overlap instead of queueing behind each
   other as a loop of ``start()`` calls does (each of which also reads the run's status
   first). ``bench/bench_limits.py`` measures both.

Each run is still created idempotently on its id by DBOS, so a batch that races another
``start`` of the same id yields one run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dbos import DBOS, SetWorkflowID

from ..errors import DurapipeError
from ..state import State
from .runs import Pipeline, RunHandle, _future_of, _loop_submit, _Started

if TYPE_CHECKING:
    from .app import App


@dataclass
class _Item:
    pipeline: Pipeline
    state: State
    run_id: str
    deadline: Any


class Batch:
    """Runs to start together, of one or several pipelines of one app.

    >>> with app.batch() as batch:                       # doctest: +SKIP
    ...     batch.add(publish, {"topic": "a"}, run_id="post-1")
    ...     batch.add(review, {"doc": "b"})
    >>> batch.handles                                     # doctest: +SKIP

    Leaving the ``with`` block starts them (nothing starts when the block raises); or
    call :meth:`start` / :meth:`start_async`. Each run is idempotent on its run id: an id
    repeated in the batch, or of a run that exists already, gives that run's handle.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self._items: list[_Item] = []
        self.handles: list[RunHandle] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, pipeline: Pipeline, inputs: Any = None, *, run_id: str | None = None,
            timeout: float | None = None) -> Batch:
        """Add a run; its inputs, run id and deadline are checked now, as ``start`` does."""
        where = f"batch item {len(self._items)}"
        if not isinstance(pipeline, Pipeline) or pipeline.app is not self.app:
            raise DurapipeError(
                f"{where}: {pipeline!r} is not a pipeline of app {self.app.name!r}; pass what "
                "app.pipeline(...) returned", app=self.app.name)
        checked = pipeline._run_id(run_id, "start_many")
        self._items.append(_Item(pipeline, pipeline._inputs(inputs), checked or str(uuid.uuid4()),
                                 pipeline._deadline(timeout)))
        return self

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.start()

    def _plan(self, found: Sequence[Any]) -> tuple[dict[str, _Item], list[_Item]]:
        """The first item of each run id, and those of them to start (not there yet)."""
        first: dict[str, _Item] = {}
        for i, item in enumerate(self._items):
            seen = first.setdefault(item.run_id, item)
            if seen.pipeline is not item.pipeline:
                raise DurapipeError(
                    f"batch item {i}: run id {item.run_id!r} is given to pipeline "
                    f"{seen.pipeline.name!r} and to {item.pipeline.name!r}; one run id names "
                    "one run", run_id=item.run_id)
        existing = {st.workflow_id: st for st in found}
        for run_id, st in existing.items():
            first[run_id].pipeline._check_existing(run_id, st)
        return first, [item for rid, item in first.items() if rid not in existing]

    def _handles(self, started: dict[str, _Started]) -> list[RunHandle]:
        return [RunHandle(self.app, item.run_id, started.get(item.run_id)) for item in self._items]

    def start(self) -> list[RunHandle]:
        """Start every run not started yet; return one handle per item, in order."""
        self.app.require_launched("batch start")
        ids = list(dict.fromkeys(item.run_id for item in self._items))
        found = DBOS.list_workflows(workflow_ids=ids, load_output=False) if ids else []
        _, new = self._plan(found)
        submit = _loop_submit()
        started: dict[str, _Started] = {}
        if submit is not None and new:
            started = submit(_start_all(new))
        else:
            for item in new:
                with SetWorkflowID(item.run_id), item.deadline:
                    h = DBOS.start_workflow(item.pipeline._workflow, item.pipeline.name,
                                            item.pipeline.version, item.state)
                started[item.run_id] = _Started(h.workflow_id, None)
        self.handles = self._handles(started)
        return self.handles

    async def start_async(self) -> list[RunHandle]:
        """:meth:`start` from async code, on the caller's event loop."""
        self.app.require_launched("batch start")
        ids = list(dict.fromkeys(item.run_id for item in self._items))
        found = await DBOS.list_workflows_async(workflow_ids=ids, load_output=False) if ids else []
        _, new = self._plan(found)
        self.handles = self._handles(await _start_all(new))
        return self.handles


async def _start_all(items: list[_Item]) -> dict[str, _Started]:
    async def one(item: _Item) -> _Started:
        with SetWorkflowID(item.run_id), item.deadline:
            h = await DBOS.start_workflow_async(item.pipeline._workflow, item.pipeline.name,
                                                item.pipeline.version, item.state)
        return _Started(h.workflow_id, _future_of(getattr(h, "task", None)))

    done = await asyncio.gather(*(one(item) for item in items))
    return {s.workflow_id: s for s in done}

