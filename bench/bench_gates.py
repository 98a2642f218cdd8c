"""Gate benchmark: latency from ``app.approve`` to the next node starting, beside DBOS's own
``send`` -> ``recv`` round trip (a workflow that sets an event, waits in ``recv`` and then
starts a step), and beside ``Admin.answer`` (the answer from the database alone, through a
``DBOSClient``, as ``durapipe approve`` and the console give it), measured interleaved in one
process on one Postgres.

Run alone: ``python bench/bench_gates.py postgresql://...`` (a database it may write to).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from typing import Any

from dbos import DBOS, SetWorkflowID

from durapipe import App, fn, gate
from durapipe.engine.admin import Admin

ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 150
WARMUP = 5
PARK_SECONDS = 0.03  # let the waiter settle in recv before the answer is sent

_started: dict[str, float] = {}
_seen = threading.Condition()


def _mark(key: str) -> None:
    with _seen:
        _started[key] = time.perf_counter()
        _seen.notify_all()


def _wait_mark(key: str) -> float:
    with _seen:
        if not _seen.wait_for(lambda: key in _started, timeout=30):
            raise TimeoutError(f"no mark for {key}")
        return _started.pop(key)


def next_node(state: dict[str, Any]) -> None:
    _mark(state["key"])


def _raw_mark(key: str) -> None:
    _mark(key)


@DBOS.workflow(name="bench.raw_gate")
async def raw_gate(key: str) -> str:
    await DBOS.set_event_async("gate:g", {"status": "waiting"})
    msg = await DBOS.recv_async(topic="gate:g", timeout_seconds=60)
    await DBOS.run_step_async({"name": "next"}, _raw_mark, key)
    return str(msg)


def _wait_event(run_id: str) -> None:
    if DBOS.get_event(run_id, "gate:g", timeout_seconds=30) is None:
        raise TimeoutError(f"{run_id} never announced its gate")
    time.sleep(PARK_SECONDS)


def _round_durapipe(app: App, pipeline: Any) -> tuple[float, float]:
    key = f"dp-{uuid.uuid4().hex[:12]}"
    handle = pipeline.start({"key": key}, run_id=key)
    _wait_event(key)
    t0 = time.perf_counter()
    app.approve(key, "g", by="bench")
    returned = (time.perf_counter() - t0) * 1000
    ms = (_wait_mark(key) - t0) * 1000
    handle.result(timeout=30)
    return ms, returned


def _round_client(admin: Admin, pipeline: Any) -> float:
    key = f"cl-{uuid.uuid4().hex[:12]}"
    handle = pipeline.start({"key": key}, run_id=key)
    _wait_event(key)
    t0 = time.perf_counter()
    admin.answer(key, "g", "approved", "bench")
    ms = (_wait_mark(key) - t0) * 1000
    handle.result(timeout=30)
    return ms


def _round_raw() -> float:
    key = f"raw-{uuid.uuid4().hex[:12]}"
    with SetWorkflowID(key):
        handle = DBOS.start_workflow(raw_gate, key)
    _wait_event(key)
    t0 = time.perf_counter()
    DBOS.send(key, {"decision": "approved"}, topic="gate:g", idempotency_key=key)
    ms = (_wait_mark(key) - t0) * 1000
    handle.get_result(polling_interval_sec=0.05)
    return ms


def section(database_url: str) -> str:
    """Measure and return a markdown section."""
    app = App("bench-gates", database_url)
    pipeline = app.pipeline("approval", gate("g", "ok?") >> fn(next_node))
    durapipe: list[float] = []
    in_approve: list[float] = []
    raw: list[float] = []
    client: list[float] = []
    with app, Admin(database_url) as admin:
        for i in range(WARMUP + ROUNDS):
            (d, a), r, c = _round_durapipe(app, pipeline), _round_raw(), _round_client(admin, pipeline)
            if i >= WARMUP:
                durapipe.append(d)
                in_approve.append(a)
                raw.append(r)
                client.append(c)
    dm, rm, cm = statistics.median(durapipe), statistics.median(raw), statistics.median(client)

    def p95(xs: list[float]) -> float:
        return sorted(xs)[int(round(0.95 * (len(xs) - 1)))]

    return "\n".join([
        "## Gates: approval to the next node",
        "",
        f"{ROUNDS} rounds, interleaved, one process, one Postgres. Milliseconds from the answer "
        "being sent to the step after the gate starting. durapipe: `app.approve` (one "
        "transaction: one UPDATE checks that the run is the app's and waits at the gate and "
        "that the person may answer, and turns the `gate:<name>` event into the decision; then "
        "the send) and the gate taking the answer. Raw DBOS: `DBOS.send` into a workflow parked "
        "in `DBOS.recv_async`.",
        "",
        "| case | median ms | p95 ms |",
        "|---|---|---|",
        f"| durapipe `app.approve` -> next node | {dm:.2f} | {p95(durapipe):.2f} |",
        f"| raw DBOS `send` -> `recv` -> next step | {rm:.2f} | {p95(raw):.2f} |",
        f"| (of durapipe: until `app.approve` returns) | {statistics.median(in_approve):.2f} "
        f"| {p95(in_approve):.2f} |",
        f"| durapipe `Admin.answer` (database alone: CLI, console) -> next node | {cm:.2f} "
        f"| {p95(client):.2f} |",
        "",
        f"`Admin.answer` / `app.approve`: {cm / dm:.2f}x (it also reads the run's owner first).",
        "",
        f"Ratio of medians: {dm / rm:.2f}x (target: within 1.2x). What durapipe adds: the "
        "UPDATE in `app.approve`'s transaction (an unknown run, a gate not waited at, a gate "
        "already answered or a person not among the approvers is refused before anything "
        "changes). The run's own recorded copy of the decision (what a fork restores) is "
        "written once the next node is under way, so it is not in this latency.",
        "",
    ])


if __name__ == "__main__":
    print(section(sys.argv[1]))
