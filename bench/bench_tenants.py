"""Tenant benchmark: time to first step for a small tenant's run enqueued behind a large
tenant's backlog, on a durapipe queue with ``per_tenant=`` beside DBOS's own partitioned
queue (the same limits, registered by hand), interleaved in one process on one Postgres.
A plain FIFO queue with the same global limit shows what the small tenant waits without
tenants.

Run alone: ``python bench/bench_tenants.py postgresql://... [rounds]``.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
from dbos import DBOS, SetEnqueueOptions

from durapipe import App, fn

ROUNDS = 20
WARMUP = 3
FIFO_ROUNDS = 3
BACKLOG = 300  # the big tenant's queued runs when measuring starts
TOP_UP = 15  # more big-tenant runs enqueued before each small one, so the backlog stays
STEP_SECONDS = 0.02
CONCURRENCY, PER_TENANT, POLL = 4, 2, 0.05

_started: dict[str, float] = {}
_seen = threading.Condition()


def _mark(key: str | None) -> None:
    if not key:
        time.sleep(STEP_SECONDS)  # a big tenant's run: some work
        return
    with _seen:
        _started[key] = time.perf_counter()
        _seen.notify_all()


def _wait_mark(key: str) -> float:
    with _seen:
        if not _seen.wait_for(lambda: key in _started, timeout=120):
            raise TimeoutError(f"no first step for {key}")
        return _started.pop(key)


def work(state: dict[str, Any]) -> None:
    _mark(state.get("key"))


@DBOS.workflow(name="bench.raw_tenant")
async def raw_work(key: str | None) -> None:
    await DBOS.run_step_async({"name": "work"}, _mark, key)


def _durapipe_case(pipeline: Any, queue: str, tenants: bool) -> Any:
    def enqueue(key: str | None, tenant: str) -> None:
        pipeline.enqueue({"key": key}, queue=queue, **({"tenant": tenant} if tenants else {}))

    return enqueue


def _raw_enqueue(key: str | None, tenant: str) -> None:
    with SetEnqueueOptions(queue_partition_key=tenant):
        DBOS.enqueue_workflow("raw-tenants", raw_work, key)


def _depth(database_url: str, queue: str) -> int:
    """The runs waiting on ``queue`` (the big tenant's backlog) right now."""
    with psycopg.connect(database_url, autocommit=True) as con:
        row = con.execute("SELECT count(*) FROM dbos.workflow_status WHERE queue_name = %s "
                          "AND status = 'ENQUEUED'", (queue,)).fetchone()
    return int(row[0]) if row else 0


def _round(enqueue: Any, top_up: int, depth: Any = None) -> float:
    for _ in range(top_up):
        enqueue(None, "big")
    if depth is not None:
        depth()
    key = uuid.uuid4().hex
    t0 = time.perf_counter()
    enqueue(key, "small")
    return (_wait_mark(key) - t0) * 1000


def section(database_url: str, rounds: int = ROUNDS) -> str:
    app = App("bench-tenants", database_url)
    app.queue("tenants", concurrency=CONCURRENCY, per_tenant=PER_TENANT, polling_interval=POLL)
    app.queue("fifo", concurrency=CONCURRENCY, polling_interval=POLL)
    pipeline = app.pipeline("work", fn(work, name="work"))
    app.listen_queues("tenants", "fifo", "raw-tenants")
    cases = {"durapipe": _durapipe_case(pipeline, "tenants", True), "raw": _raw_enqueue}
    queues = {"durapipe": "tenants", "raw": "raw-tenants"}
    times: dict[str, list[float]] = {name: [] for name in cases}
    depths: dict[str, list[int]] = {name: [] for name in cases}
    with app:
        DBOS.register_queue("raw-tenants", global_concurrency=CONCURRENCY,
                            partition_concurrency=PER_TENANT, polling_interval_sec=POLL)
        for enqueue in cases.values():
            for _ in range(BACKLOG):
                enqueue(None, "big")
        for i in range(WARMUP + rounds):
            for name, enqueue in cases.items():
                seen = depths[name] if i >= WARMUP else []
                ms = _round(enqueue, TOP_UP,
                            lambda q=queues[name], d=seen: d.append(_depth(database_url, q)))
                if i >= WARMUP:
                    times[name].append(ms)
        fifo_enqueue = _durapipe_case(pipeline, "fifo", False)
        for _ in range(BACKLOG // 3):
            fifo_enqueue(None, "big")
        fifo = [_round(fifo_enqueue, TOP_UP) for _ in range(FIFO_ROUNDS)]
        for q in ("tenants", "fifo", "raw-tenants"):  # leave no backlog behind
            for st in DBOS.list_workflows(queue_name=q, status=["ENQUEUED"], load_input=False,
                                          load_output=False):
                DBOS.cancel_workflow(st.workflow_id)
    dm, rm = statistics.median(times["durapipe"]), statistics.median(times["raw"])

    def p95(xs: list[float]) -> float:
        return sorted(xs)[int(round(0.95 * (len(xs) - 1)))]

    return "\n".join([
        "## Tenants: a small tenant's first step behind a big tenant's backlog",
        "",
        f"{rounds} rounds, interleaved, one process, one Postgres. A big tenant keeps about "
        f"{BACKLOG} runs queued (each a {STEP_SECONDS * 1000:.0f} ms step; {TOP_UP} more before "
        "each measurement); then one run of a small tenant is enqueued and the milliseconds "
        "until its first step starts are measured. Both queues: concurrency "
        f"{CONCURRENCY}, {PER_TENANT} per tenant, polled every {POLL * 1000:.0f} ms. durapipe: "
        f"`app.queue(..., concurrency={CONCURRENCY}, per_tenant={PER_TENANT})` and "
        "`enqueue(..., tenant=)`. Raw DBOS: `DBOS.register_queue(global_concurrency=, "
        "partition_concurrency=)` and `SetEnqueueOptions(queue_partition_key=)`.",
        "",
        "| case | median ms | p95 ms |",
        "|---|---|---|",
        f"| durapipe queue with `per_tenant` | {dm:.1f} | {p95(times['durapipe']):.1f} |",
        f"| raw DBOS partitioned queue | {rm:.1f} | {p95(times['raw']):.1f} |",
        f"| (reference: plain FIFO queue, {FIFO_ROUNDS} rounds behind {BACKLOG // 3} runs) | "
        f"{statistics.median(fifo):.1f} | {max(fifo):.1f} |",
        "",
        f"The big tenant's runs waiting when each small run was enqueued: durapipe "
        f"{min(depths['durapipe'])} to {max(depths['durapipe'])}, raw DBOS "
        f"{min(depths['raw'])} to {max(depths['raw'])}.",
        "",
        f"Ratio of medians durapipe / raw DBOS: {dm / rm:.2f}x. Both wait for a poll of the "
        "queue and for a free slot under the global limit, not for the big tenant's backlog; "
        "on the FIFO queue the small run waits for the runs queued before it.",
        "",
    ])


if __name__ == "__main__":
    print(section(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else ROUNDS))
