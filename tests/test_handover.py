"""A process that dequeues a run of a pipeline it does not register hands it over.

DBOS puts what it recovers, resumes or forks on its internal queue, which every launched
process of the app dequeues from, whatever pipelines it registers. Such a run must reach
a process that has its pipeline, run each finished step once, and not stay PENDING.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dbutil import lines, sql, wait_for
from durapipe import App, fn
from durapipe.cli import cli

SCRIPT = Path(__file__).parent / "scripts" / "handover_app.py"
SHAPE_QUEUE = "durapipe-shape-handover-app-"


def start(role: str, url: str, log: Path, executor: str, *run: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), role, url, str(log), executor, *run],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc


def ready(proc: subprocess.Popen[str]) -> list[str]:
    """Read the process's output up to its ``ready`` line."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip() == "ready":
            return seen
    raise AssertionError(f"process exited before it was ready: {''.join(seen)}")


def stop(proc: subprocess.Popen[str]) -> str:
    """Terminate a process that must still be alive; return the rest of its output."""
    assert proc.poll() is None, "the process died"
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


def count(log: Path, entry: str) -> int:
    return sum(1 for ln in lines(log) if ln.split()[0] == entry)


def unfinished(url: str) -> list[tuple[str, str, str | None]]:
    return sql(url, "SELECT workflow_uuid, status, queue_name FROM dbos.workflow_status "
                    "WHERE status NOT IN ('SUCCESS', 'ERROR') ORDER BY workflow_uuid")


def kill_in_step_two(url: str, log: Path, run_id: str, pipeline: str = "slow") -> None:
    """Start run ``run_id`` in a worker with executor id w-1; SIGKILL it inside step two."""
    Path(f"{log}.hold").touch()
    worker = start("worker", url, log, "w-1", run_id, pipeline)
    try:
        wait_for(lambda: count(log, f"two-start:{run_id}") == 1, timeout=60,
                 what="the run to reach step two")
    finally:
        worker.kill()
        worker.communicate()
    Path(f"{log}.hold").unlink()


def all_handed_over(url: str, n: int) -> bool:
    rows = unfinished(url)
    return len(rows) == n and all(s == "ENQUEUED" and (q or "").startswith(SHAPE_QUEUE)
                                  for _, s, q in rows)


def finish_on_worker(url: str, log: Path, executor: str, run_id: str) -> None:
    """Start a worker (the process with the pipeline) and wait until it has finished
    ``run_id`` and nothing of the database is left unfinished."""
    worker = start("worker", url, log, executor)
    try:
        ready(worker)
        wait_for(lambda: sql(url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid "
                                  "= %s", run_id) == [("SUCCESS",)],
                 timeout=60, what=f"the worker to finish {run_id}")
        wait_for(lambda: unfinished(url) == [], what="every workflow to finish")
    finally:
        stop(worker)


def assert_ran_once(log: Path, run_id: str) -> None:
    # step two was interrupted by the kill and ran again; every finished step ran once
    assert {e: count(log, f"{e}:{run_id}") for e in ("one", "two-start", "two", "side", "three")} \
        == {"one": 1, "two-start": 2, "two": 1, "side": 1, "three": 1}


@pytest.mark.slow
def test_recovered_run_is_handed_to_the_process_with_its_pipeline(database_url: str,
                                                                  tmp_path: Path) -> None:
    log = tmp_path / "log"
    kill_in_step_two(database_url, log, "r1")
    # Two launched processes of the app that lack pipeline 'slow': one registers no
    # pipeline, one only another. They are the only ones dequeuing DBOS's internal queue
    # when DBOS recovers the dead worker's run and its child workflow onto it.
    bare, some = start("bare", database_url, log, "bare-1"), start("some", database_url, log, "some-1")
    ready(bare)
    ready(some)
    found: list[str] = []

    def recovered() -> bool:  # Postgres may take a moment to end the killed session
        res = CliRunner().invoke(cli, ["recover", "w-1", "--database-url", database_url])
        assert res.exit_code == 0 or "is alive" in res.output, res.output
        found.append(res.output)
        return res.exit_code == 0
    wait_for(recovered, what="recovery of the killed worker's executor")
    assert "re-queued 2 workflow(s) of w-1" in found[-1]
    wait_for(lambda: all_handed_over(database_url, 2), timeout=60,
             what="the run and its child to be handed over to the queue of their shape")
    assert count(log, "two-start:r1") == 1  # nothing ran in the processes without the pipeline
    # no process with that shape runs yet: the run is listed as waiting for one
    res = CliRunner().invoke(cli, ["versions", "--database-url", database_url, "--json"])
    assert res.exit_code == 0, res.output
    waiting = json.loads(res.output)["waiting"]
    assert [(w["run_id"], w["pipeline"]) for w in waiting] == [("r1", "slow")]
    # the killed worker's executor restarts: it listens to its shape's queue and finishes both
    finish_on_worker(database_url, log, "w-1", "r1")
    assert_ran_once(log, "r1")
    handed = stop(bare) + stop(some)
    assert handed.count("handed run r1 ") == 2, handed
    assert "is not a registered workflow function" not in handed


@pytest.mark.slow
def test_restarted_executor_recovers_while_processes_without_the_pipeline_run(
        database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    kill_in_step_two(database_url, log, "r2")
    bare, some = start("bare", database_url, log, "bare-2"), start("some", database_url, log, "some-2")
    ready(bare)
    ready(some)
    # the dead worker's executor restarts and recovers onto DBOS's internal queue, which
    # all three processes dequeue from: whichever takes the run, it ends on the worker
    finish_on_worker(database_url, log, "w-1", "r2")
    assert_ran_once(log, "r2")
    others = stop(bare) + stop(some)
    assert "is not a registered workflow function" not in others
    assert "Traceback" not in others


@pytest.mark.slow
def test_resume_of_a_cancelled_run_reaches_the_process_with_its_pipeline(
        database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    # (pipeline 'line' has no child workflow: resuming a run resumes no cancelled child)
    kill_in_step_two(database_url, log, "r3", "line")
    res = CliRunner().invoke(cli, ["cancel", "r3", "--database-url", database_url])
    assert res.exit_code == 0, res.output
    bare = start("bare", database_url, log, "bare-3")
    ready(bare)
    # resuming puts the run on DBOS's internal queue; only the process without it listens
    res = CliRunner().invoke(cli, ["resume", "r3", "--database-url", database_url])
    assert res.exit_code == 0, res.output
    wait_for(lambda: sql(database_url, "SELECT status, queue_name FROM dbos.workflow_status "
                                       "WHERE workflow_uuid = 'r3'")
             == [("ENQUEUED", SHAPE_QUEUE + shape_of(database_url, "r3"))],
             timeout=60, what="the bare process to hand r3 over")
    finish_on_worker(database_url, log, "w-2", "r3")
    assert sql(database_url, "SELECT count(*) FROM dbos.workflow_status WHERE status IN "
                             "('PENDING', 'ENQUEUED')") == [(0,)]
    assert_ran_once(log, "r3")
    assert "handed run r3 " in stop(bare)


def shape_of(url: str, run_id: str) -> str:
    row = sql(url, "SELECT (inputs::jsonb)->'positionalArgs'->>1 FROM dbos.workflow_input "
                   "WHERE workflow_uuid = %s", run_id)
    return str(row[0][0])


def _noop(state: dict[str, Any]) -> dict[str, Any]:
    return {}


def test_dbos_finds_a_run_workflow_for_every_pipeline_of_the_app(
        make_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch) -> None:
    from dbos._dbos import _get_or_create_dbos_registry

    from durapipe.engine import handover
    from durapipe.engine.interpreter import run_workflow

    first = make_app("handover-names")
    first.pipeline("p-one", fn(_noop))
    first.pipeline("p-two", fn(_noop))
    with first:  # records the app's pipelines in durapipe.shapes
        # on the DBOS release durapipe is tested with, DBOS's map of workflow names
        # answers a run of any pipeline, registered here or not
        names = _get_or_create_dbos_registry().workflow_info_map
        assert names.get("durapipe.run:deployed-later") is run_workflow("deployed-later")
        assert names.get("no-such-workflow") is None
    second = make_app("handover-names")
    second.pipeline("p-two", fn(_noop))
    # on another release, the app's recorded pipelines missing here are registered
    monkeypatch.setattr(handover, "dbos_release", lambda: "0.0.0")
    made: list[str] = []
    handover.prepare(second, made.append)
    assert made == ["p-one"]


def _count_call(state: dict[str, Any]) -> dict[str, Any]:
    with open(state["log"], "a") as f:
        f.write("step\n")
    return {"done": True}


def test_process_without_the_pipeline_stops_cleanly_after_a_hand_over(
        make_app: Callable[..., App], database_url: str, tmp_path: Path) -> None:
    from dbos import DBOS, SetWorkflowID
    from dbos._utils import INTERNAL_QUEUE_NAME

    from durapipe.engine.interpreter import run_workflow

    log = tmp_path / "log"
    worker = make_app("handover-stop")
    pipe = worker.pipeline("p", fn(_count_call))
    bare = make_app("handover-stop")
    with bare:
        # what DBOS's resume and fork do: the run goes on DBOS's internal queue
        with SetWorkflowID("s1"):
            DBOS.enqueue_workflow(INTERNAL_QUEUE_NAME, run_workflow("p"), "p", pipe.version,
                                  {"log": str(log)})
        wait_for(lambda: sql(database_url, "SELECT status, queue_name FROM dbos.workflow_status "
                                           "WHERE workflow_uuid = 's1'")
                 == [("ENQUEUED", SHAPE_QUEUE.replace("handover-app", "handover-stop")
                      + pipe.version)], what="the process without 'p' to hand s1 over")
    # stopping it while it waits for the run's end records nothing for the run
    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 's1'") \
        == [("ENQUEUED",)]
    assert not log.exists()
    with worker:
        assert worker.get_run("s1").result(timeout=60).state["done"] is True
    assert lines(log) == ["step"]
