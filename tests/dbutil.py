"""Small helpers for tests that read the database or run a script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url


def sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one query against a test database and return its rows."""
    with psycopg.connect(url, autocommit=True) as con:
        cur = con.execute(query, params or None)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def spawn(script: Path, *args: str) -> subprocess.Popen[str]:
    """Start a Python script in its own process (so it can be SIGKILLed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(script), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(pred: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of these (start, end) spans open at one moment (an end before a start at
    the same instant)."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = peak = 0
    for _, d in edges:
        now += d
        peak = max(peak, now)
    return peak


@contextmanager
def scratch_database(server_url: str, prefix: str = "durapipe_test") -> Iterator[str]:
    """A fresh, empty database on the test server, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_url(server_url).set(database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(False)
    finally:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def step_label(function_name: str) -> str | None:
    """The label a kill script logs for a step row: the step's name."""
    return function_name.split(":")[1]


def step_rows(url: str, labels: list[str],
              label_of: Callable[[str], str | None] = step_label) -> list[str]:
    """``run:label`` of every recorded step named by a label, in runs, children and tasks."""
    rows = sql(url, "SELECT workflow_uuid, function_name FROM dbos.operation_outputs "
                    "WHERE function_name LIKE '0%:%'")
    out = [(wf.split("/")[0], label_of(name)) for wf, name in rows]
    return [f"{run}:{label}" for run, label in out if label in labels]


def wait_for_idle_database(url: str) -> None:
    """Wait until no session of a killed process is left on ``url``'s database: a statement
    it sent just before the kill is committed or rolled back by then, so what the test reads
    next is what the killed process left behind."""
    query = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
             "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
    wait_for(lambda: sql(url, query) == [(0,)], what="the killed process's sessions to end")


def kill_then_recover(script: Path, url: str, log: Path, runs: int, kill_at: int | str,
                      run_prefix: str, after: dict[str, set[str]], width: int,
                      label_of: Callable[[str], str | None] = step_label,
                      *script_args: str) -> None:
    """Run ``script`` until it SIGKILLs itself right after the side effect ``kill_at`` names
    (the N-th line, or ``<run>:<label>``), run it again to recover, and check the
    exactly-once rule of the kill tests (see their docstrings).

    ``after`` maps each step label to the labels that must be recorded before it starts:
    a step is in flight at the kill only if all of those were recorded and it was not, and
    at most ``width`` steps of one run (its widest parallel group) are in flight at once.
    ``label_of`` turns a step row's function name into the label the script logs for it;
    ``script_args`` go to both lives of the script after its usual four arguments.
    """
    labels = list(after)
    first = spawn(script, url, str(log), str(runs), str(kill_at), *script_args)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == -9, out
    wait_for_idle_database(url)
    logged = lines(log)
    assert len(logged) == len(set(logged)), "a step ran twice before the kill"
    if isinstance(kill_at, int):
        assert len(logged) == kill_at
    else:
        assert logged[-1] == kill_at
    recorded = set(step_rows(url, labels, label_of))
    assert recorded <= set(logged), "a step was recorded without having run"
    # The window: steps that ran but were not recorded when the process died. The step that
    # killed it is one; the others can only be steps in flight at the same time, each with
    # everything before it in its run recorded, so at most one per parallel branch.
    window = set(logged) - recorded
    assert logged[-1] in window, "the killing step cannot have been recorded"
    for s in window:
        run, label = s.split(":")
        missing = {f"{run}:{x}" for x in after[label]} - recorded
        assert not missing, f"{s} ran before {sorted(missing)} was recorded"
    per_run = Counter(s.split(":")[0] for s in window)
    assert max(per_run.values()) <= width, (window, width)

    again = spawn(script, url, str(log), str(runs), "0", *script_args)
    out, _ = again.communicate(timeout=180)
    assert again.returncode == 0 and "ALL DONE" in out, out

    rows = Counter(step_rows(url, labels, label_of))
    effects = Counter(lines(log))
    expected = {f"{run_prefix}{i}:{label}" for i in range(runs) for label in labels}
    assert set(rows) == expected and set(rows.values()) == {1}   # one row per step
    for s in expected:
        # Recorded before the kill: never again. In flight: once more. Not started: once.
        assert effects[s] == (2 if s in window else 1), (s, effects[s], s in window)
    assert sum(effects.values()) == len(expected) + len(window)
    assert sql(url, "SELECT count(*) FROM dbos.workflow_status WHERE status <> 'SUCCESS'") == [(0,)]



def bytes_written(url: str, run_id: str) -> int:
    """Bytes of inputs and outputs (workflows and steps) a run and its children recorded."""
    total = 0
    for table, column in (("workflow_input", "inputs"), ("workflow_output", "output"),
                          ("operation_outputs", "output")):
        rows = sql(url, f"SELECT coalesce(sum(length({column})), 0) FROM dbos.{table} "
                        "WHERE workflow_uuid = %s OR workflow_uuid LIKE %s", run_id, f"{run_id}/%")
        total += int(rows[0][0])
    return total
