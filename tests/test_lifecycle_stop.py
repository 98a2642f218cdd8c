"""A clean stop of a process never loses a run: every run it leaves is PENDING, and the
next process with the same executor id resumes it without repeating a finished step.

Each case starts five runs in a subprocess (at a gate, in a durable sleep, in an async
step, in a sync step, with a dispatched task in flight), stops the process one of the
clean ways, checks that nothing was recorded as failed, and restarts it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dbutil import lines, spawn, sql, wait_for

SCRIPT = Path(__file__).parent / "scripts" / "graceful_stop.py"
RUNS = ["r-gate", "r-sleep", "r-async", "r-sync", "r-task"]
IN_PLACE = {"g0", "s0", "async-start", "sync-start", "task-start"}
pytestmark = pytest.mark.slow


def labels(log: Path) -> Counter[str]:
    return Counter(line.rsplit(" ", 1)[0] for line in lines(log))


def recorded_steps(url: str) -> set[str]:
    rows = sql(url, "SELECT function_name FROM dbos.operation_outputs WHERE function_name LIKE '0%:%'")
    return {name.split(":", 1)[1] for (name,) in rows}


def statuses(url: str) -> dict[str, str]:
    return dict(sql(url, "SELECT workflow_uuid, status FROM dbos.workflow_status"))


def gate_waiting(url: str) -> bool:
    rows = sql(url, "SELECT value FROM dbos.workflow_events WHERE workflow_uuid = 'r-gate' "
                    "AND key = 'gate:ok'")
    return bool(rows) and json.loads(rows[0][0]).get("status") == "waiting"


def dbos_start(url: str, log: Path) -> subprocess.Popen[str]:
    """`dbos start` in a directory whose dbos-config.yaml starts the uvicorn service."""
    folder = log.parent / "service"
    folder.mkdir()
    command = f"{sys.executable} {SCRIPT} {url} {log} first uvicorn"
    (folder / "dbos-config.yaml").write_text(
        f"name: stop-app\nlanguage: python\nruntimeConfig:\n  start:\n    - \"{command}\"\n")
    dbos = Path(sys.executable).with_name("dbos")
    return subprocess.Popen([str(dbos), "start"], cwd=folder, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop_then_resume(url: str, log: Path, mode: str) -> None:
    first = dbos_start(url, log) if mode == "dbos-start" else spawn(
        SCRIPT, url, str(log), "first", mode)
    if mode in ("uvicorn", "dbos-start"):
        try:
            wait_for(lambda: IN_PLACE <= set(labels(log)) and gate_waiting(url), timeout=60,
                     what="runs in place")
            first.send_signal(signal.SIGTERM)  # dbos start forwards it to the service
        except BaseException:
            first.kill()
            raise
    out, _ = first.communicate(timeout=90)  # until the service closed its output too
    if mode == "uvicorn":
        # uvicorn stops gracefully on SIGTERM, then re-raises it to end the process with it.
        assert first.returncode == -signal.SIGTERM, out
    elif mode != "dbos-start":  # dbos start exits at once after forwarding the signal
        assert first.returncode == 0, out
    assert "left PENDING for recovery" in out, out  # the log says what was left

    after_stop = statuses(url)
    # Nothing is recorded as failed or cancelled; every run is still PENDING.
    assert {after_stop[r] for r in RUNS} == {"PENDING"}, after_stop
    assert "ERROR" not in after_stop.values() and "CANCELLED" not in after_stop.values()
    done_before = recorded_steps(url)
    effects_before = labels(log)

    second = spawn(SCRIPT, url, str(log), "second", "uvicorn" if mode == "dbos-start" else mode)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0, out
    assert out.count("SUCCESS") == len(RUNS), out
    assert set(statuses(url).values()) == {"SUCCESS"}

    effects = labels(log)
    for label in ("g0", "g1", "s0", "s1", "a0", "a1", "y0", "y1", "d0", "d1", "d2",
                  "async-end", "task-end"):
        assert effects[label] == 1, (label, effects)
    # A step recorded before the stop never ran again.
    for step, start in (("slow_async", "async-start"), ("slow_sync", "sync-start"),
                        ("task_body", "task-start")):
        if step in done_before:
            assert effects[start] == effects_before[start] == 1, (step, effects)
    # The sync step in flight cannot be interrupted: where the stopped process let it end
    # (all but uvicorn, which re-raises SIGTERM at once), it was recorded and not re-run.
    assert effects["sync-end"] == 1, effects
    if effects_before["sync-end"]:
        assert "slow_sync" in done_before, done_before
    mode = "uvicorn" if mode == "dbos-start" else mode
    if mode == "drain":
        # drain let the async step and the task finish before stopping: nothing re-ran.
        assert {"slow_async", "task_body"} <= done_before, done_before
        assert effects["async-start"] == 1 and effects["task-start"] == 1
    else:
        # Stopped mid-await: the code after the await never ran in the first process.
        assert effects_before["async-end"] == 0 and effects_before["task-end"] == 0
        assert effects["async-start"] == 2 and effects["task-start"] == 2


@pytest.mark.parametrize("mode", ["exit", "shutdown", "drain", "lifespan", "uvicorn", "dbos-start"])
def test_a_clean_stop_leaves_runs_pending_and_the_next_process_resumes_them(
    database_url: str, tmp_path: Path, mode: str
) -> None:
    stop_then_resume(database_url, tmp_path / "log", mode)
