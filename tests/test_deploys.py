"""Deploys: new code never strands or silently fails a run in flight.

Each test runs the app of ``scripts/deploy_app.py`` in one code version, kills it with runs
in flight, and hands them to processes with other code (``DEPLOY_CODE``), counting the side
effects each step leaves in a log file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dbutil import lines, sql, wait_for

SCRIPT = Path(__file__).parent / "scripts" / "deploy_app.py"
pytestmark = pytest.mark.slow


def env(database_url: str, log: Path, code: str, **extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", DURAPIPE_DATABASE_URL=database_url,
                DEPLOY_LOG=str(log), DEPLOY_CODE=code, **extra)


def popen(args: list[str], environ: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(args, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def durapipe(*args: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "durapipe.cli", *args], env=environ,
                          capture_output=True, text=True, timeout=120)


def worker(script: Path, executor: str, environ: dict[str, str]) -> subprocess.Popen[str]:
    proc = popen([sys.executable, "-m", "durapipe.cli", "worker", str(script),
                  "--executor-id", executor], environ)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert f"worker {executor} ready" in line, line
    return proc


def stop(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=60)


def status(url: str, run_id: str) -> str | None:
    rows = sql(url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", run_id)
    return str(rows[0][0]) if rows else None


def at_gate(url: str, run_id: str) -> bool:
    try:
        return bool(sql(url, "SELECT 1 FROM dbos.workflow_events WHERE workflow_uuid = %s "
                             "AND key = 'gate:legal'", run_id))
    except psycopg.errors.UndefinedTable:   # the process has not created DBOS's tables yet
        return False


def output(url: str, run_id: str) -> dict[str, Any]:
    rows = sql(url, "SELECT output FROM dbos.workflow_output WHERE workflow_uuid = %s", run_id)
    result: dict[str, Any] = json.loads(rows[0][0])
    return result


def approve(run_id: str, environ: dict[str, str], script: Path = SCRIPT) -> None:
    res = durapipe("approve", run_id, "legal", "--by", "alice", "--app", str(script), environ=environ)
    assert res.returncode == 0, res.stdout + res.stderr


def finish(url: str, *run_ids: str) -> None:
    for run_id in run_ids:
        wait_for(lambda run_id=run_id: status(url, run_id) == "SUCCESS", timeout=90,  # type: ignore[misc]
                 what=f"run {run_id} to succeed")


def start_then_kill(url: str, log: Path, runs: list[str], wait: list[str], block: str | None = None,
                    code: str = "v1") -> None:
    """Start ``runs`` in a process with executor id ``old-1``; SIGKILL it once the runs in
    ``wait`` are at the gate and ``block`` (``step:run``) is blocked."""
    marker = log.with_suffix(".marker")
    extra = {"DEPLOY_EXECUTOR": "old-1", "DEPLOY_MARKER": str(marker)}
    if block:
        extra["DEPLOY_BLOCK"] = block
    proc = popen([sys.executable, str(SCRIPT), *runs], env(url, log, code, **extra))
    try:
        wait_for(lambda: all(at_gate(url, r) for r in wait) and (not block or marker.exists()),
                 timeout=90, what="the runs to reach their kill points")
    finally:
        proc.kill()
        proc.wait()


def test_main_module_under_dbos_start_recovered_by_a_worker_loading_the_file(
        database_url: str, tmp_path: Path) -> None:
    """The same source as ``__main__`` (dbos start), then as a module loaded from its path."""
    home = tmp_path / "svc"
    home.mkdir()
    script = home / "deploy_app.py"
    shutil.copy(SCRIPT, script)
    (home / "dbos-config.yaml").write_text(
        "name: deploys\nlanguage: python\nsystem_database_url: ${DURAPIPE_DATABASE_URL}\n"
        f"runtimeConfig:\n  start:\n    - \"{sys.executable} deploy_app.py s-1 s-2\"\n")
    log, marker = tmp_path / "log", tmp_path / "marker"
    environ = env(database_url, log, "v1", DEPLOY_BLOCK="two:s-2", DEPLOY_MARKER=str(marker))
    dbos = popen([str(Path(sys.executable).parent / "dbos"), "start"], environ, cwd=home)
    try:
        wait_for(lambda: marker.exists() and bool(marker.read_text()) and at_gate(database_url, "s-1"),
                 timeout=90, what="s-1 at its gate and s-2 inside step two")
        os.kill(int(marker.read_text()), signal.SIGKILL)
    finally:
        dbos.wait(timeout=60)
    (executor,) = {r[0] for r in sql(database_url, "SELECT executor_id FROM dbos.workflow_status")}
    assert status(database_url, "s-1") == status(database_url, "s-2") == "PENDING"

    environ = env(database_url, log, "v1")
    live = worker(script, "live-2", environ)
    try:
        res = durapipe("recover", executor, "--database-url", database_url, environ=environ)
        assert res.returncode == 0 and "re-queued 2 workflow(s)" in res.stdout, res.stdout + res.stderr
        wait_for(lambda: Counter(lines(log))["two:s-2"] == 2, timeout=90, what="s-2 to run step two again")
        for run_id in ("s-1", "s-2"):
            approve(run_id, environ, script)
        finish(database_url, "s-1", "s-2")
    finally:
        stop(live)
    effects = Counter(lines(log))
    assert effects == {"one:s-1": 1, "two:s-1": 1, "three:s-1": 1,
                       "one:s-2": 1, "two:s-2": 2, "three:s-2": 1}   # two:s-2 was interrupted
    steps = Counter(r[0] for r in sql(database_url, "SELECT workflow_uuid || ' ' || function_name "
                                                    "FROM dbos.operation_outputs WHERE function_name ~ '^0'"))
    assert set(steps.values()) == {1}
    assert sql(database_url, "SELECT DISTINCT status FROM dbos.workflow_status") == [("SUCCESS",)]


def test_run_at_a_gate_finishes_on_code_changed_after_the_gate(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    start_then_kill(database_url, log, ["g-1"], wait=["g-1"])
    environ = env(database_url, log, "v2-later")
    new = worker(SCRIPT, "old-1", environ)   # the new code, in the dead process's place
    try:
        approve("g-1", environ)
        finish(database_url, "g-1")
    finally:
        stop(new)
    assert Counter(lines(log)) == {"one:g-1": 1, "two:g-1": 1, "added:g-1": 1, "three:g-1": 1}
    state = output(database_url, "g-1")
    assert state["added"] is True and state["draft"] == "[Write a poem about g-1.]"


def test_rollback_continues_a_run_the_new_code_took_over(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    start_then_kill(database_url, log, ["b-1"], wait=["b-1"])
    (started,) = sql(database_url, "SELECT shape FROM durapipe.shapes")[0]
    new = worker(SCRIPT, "old-1", env(database_url, log, "v2-later"))
    try:
        wait_for(lambda: bool(sql(database_url, "SELECT 1 FROM durapipe.adopted WHERE run_id = 'b-1'")),
                 timeout=90, what="the new code to continue b-1")
    finally:
        new.kill()
        new.wait()
    # the run now names the shape it runs as; the one it started by is kept
    ((args,),) = sql(database_url, "SELECT inputs::jsonb->'positionalArgs' FROM dbos.workflow_input")
    assert args[1] != started
    assert sql(database_url, "SELECT started_by, running_as FROM durapipe.adopted") == [(started, args[1])]

    environ = env(database_url, log, "v1")
    old = worker(SCRIPT, "old-1", environ)   # rolled back: the old code in the same place
    try:
        approve("b-1", environ)
        finish(database_url, "b-1")
    finally:
        stop(old)
    assert Counter(lines(log)) == {"one:b-1": 1, "two:b-1": 1, "three:b-1": 1}
    assert output(database_url, "b-1")["draft"] == "[Write about b-1.]"


def test_run_past_a_changed_node_waits_for_a_worker_with_its_shape(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    # w-1 passes node one and waits at the gate; w-2 is killed inside node one (not recorded)
    start_then_kill(database_url, log, ["w-1", "w-2"], wait=["w-1"], block="one:w-2")
    old_env, new_env = env(database_url, log, "v1"), env(database_url, log, "v2-early")

    check = durapipe("check-compat", str(SCRIPT), "--json", "--strict", environ=new_env)
    assert check.returncode == 1, check.stdout + check.stderr
    verdicts = {r["run_id"]: r for r in json.loads(check.stdout)}
    assert verdicts["w-1"]["verdict"] == "wait" and verdicts["w-1"]["node"] == "0.0"
    assert "already passed" in verdicts["w-1"]["reason"]
    assert verdicts["w-2"]["verdict"] == "continue"
    assert durapipe("check-compat", str(SCRIPT), environ=old_env).stdout.strip().endswith(
        "2 run(s) would continue, 0 would wait")

    new = worker(SCRIPT, "old-1", new_env)
    try:
        wait_for(lambda: at_gate(database_url, "w-2") and bool(sql(
            database_url, "SELECT 1 FROM durapipe.waiting WHERE run_id = 'w-1'")),
            timeout=90, what="w-2 to reach its gate on the new code and w-1 to wait")
        assert status(database_url, "w-1") == "PENDING"
        report = json.loads(durapipe("versions", "--json", environ=new_env).stdout)
        (waiting,) = report["waiting"]
        assert waiting["run_id"] == "w-1" and waiting["waiting_node"] == "0.0"
        assert "durapipe versions retire" in waiting["reason"]
        # w-1 waits for the old shape; w-2 now runs as the new shape, at its gate
        counts = {r["shape"]: (r["gate"], r["waiting"]) for r in report["shapes"]}
        assert sorted(counts.values()) == [(0, 1), (1, 0)]

        old = worker(SCRIPT, "old-3", old_env)   # an old-code worker, started later
        try:
            approve("w-1", old_env)
            approve("w-2", new_env)
            finish(database_url, "w-1", "w-2")
        finally:
            stop(old)
        assert new.poll() is None   # the new-code process never failed w-1 and is still up
    finally:
        stop(new)
    assert Counter(lines(log)) == {"one:w-1": 1, "two:w-1": 1, "three:w-1": 1,
                                   "one:w-2": 2, "two:w-2": 1, "three:w-2": 1}
    assert sql(database_url, "SELECT workflow_uuid, executor_id FROM dbos.workflow_status "
                             "ORDER BY 1") == [("w-1", "old-3"), ("w-2", "old-1")]
    assert sql(database_url, "SELECT count(*) FROM durapipe.waiting") == [(0,)]


def test_patched_marker_gives_old_and_new_runs_their_own_branch(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    start_then_kill(database_url, log, ["p-old"], wait=["p-old"])
    environ = env(database_url, log, "patched")
    new = worker(SCRIPT, "old-1", environ)
    starter = popen([sys.executable, str(SCRIPT), "p-new"], dict(environ, DEPLOY_EXECUTOR="starter"))
    try:
        wait_for(lambda: at_gate(database_url, "p-new"), timeout=90, what="p-new at its gate")
        approve("p-old", environ)
        approve("p-new", environ)
        finish(database_url, "p-old", "p-new")
    finally:
        stop(new, starter)
    effects = Counter(lines(log))
    assert effects["three:p-old"] == 1 and effects["three_v2:p-new"] == 1
    assert "three_v2:p-old" not in effects and "three:p-new" not in effects
    assert output(database_url, "p-old")["three"] == "old"
    assert output(database_url, "p-new")["three"] == "new"


def test_retire_cancels_waiting_runs_only_when_told(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    start_then_kill(database_url, log, ["r-1"], wait=["r-1"])
    environ = env(database_url, log, "v2-early")
    new = worker(SCRIPT, "old-1", environ)
    try:
        wait_for(lambda: bool(sql(database_url, "SELECT 1 FROM durapipe.waiting")), timeout=90,
                 what="r-1 to wait for its shape")
        (shape,) = sql(database_url, "SELECT shape FROM durapipe.waiting WHERE run_id = 'r-1'")[0]
        refused = durapipe("versions", "retire", shape, environ=environ)
        assert refused.returncode == 1 and "1 run(s) wait for shape" in refused.stderr
        assert status(database_url, "r-1") == "PENDING"
        done = durapipe("versions", "retire", shape, "--cancel", environ=environ)
        assert done.returncode == 0 and "cancelled 1 run(s)" in done.stdout, done.stdout + done.stderr
        wait_for(lambda: status(database_url, "r-1") == "CANCELLED", what="r-1 to be cancelled")
        report = json.loads(durapipe("versions", "--json", environ=environ).stdout)
        assert report["waiting"] == []
    finally:
        stop(new)
    assert Counter(lines(log)) == {"one:r-1": 1, "two:r-1": 1}


def test_run_handed_to_a_shape_no_process_runs_waits_for_a_compatible_one(
        database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    start_then_kill(database_url, log, ["h-1"], wait=["h-1"])
    bare = worker(SCRIPT, "bare-1", env(database_url, log, "none"))  # no pipeline at all
    try:
        # recovery puts the run on DBOS's internal queue; the process without pipeline
        # 'flow' hands it to the queue of its shape, which no live process runs
        def recovered() -> bool:  # Postgres may take a moment to end the killed session
            res = durapipe("recover", "old-1", environ=env(database_url, log, "v1"))
            assert res.returncode == 0 or "is alive" in res.stdout + res.stderr, \
                res.stdout + res.stderr
            return res.returncode == 0
        wait_for(recovered, what="recovery of the killed process's executor")
        wait_for(lambda: sql(database_url, "SELECT status, starts_with(queue_name, "
                                           "'durapipe-shape-deploys-') FROM dbos.workflow_status "
                                           "WHERE workflow_uuid = 'h-1'") == [("ENQUEUED", True)],
                 timeout=60, what="the run to be handed over")
        res = durapipe("versions", "--json", environ=env(database_url, log, "v1"))
        assert [w["run_id"] for w in json.loads(res.stdout)["waiting"]] == ["h-1"]
        # new code compatible with the run's progress takes it over at launch
        environ = env(database_url, log, "v2-later")
        new = worker(SCRIPT, "new-1", environ)
        try:
            approve("h-1", environ)
            finish(database_url, "h-1")
        finally:
            stop(new)
    finally:
        stop(bare)
    assert Counter(lines(log)) == {"one:h-1": 1, "two:h-1": 1, "added:h-1": 1, "three:h-1": 1}
