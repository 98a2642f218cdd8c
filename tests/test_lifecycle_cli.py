"""Ctrl-C in `durapipe run` detaches instead of failing the run; executor ids never collide
by accident; recover and resume leave a live process's runs alone."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dbutil import lines, sql, wait_for
from durapipe import App
from durapipe.engine.admin import Admin
from durapipe.errors import AppStateError, OperatorError
from ops import lifecycle_app

TESTS = Path(__file__).parent
TARGET = "ops.lifecycle_app"


def durapipe(*args: str, slow: float = 30) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", LIFE_SLOW=str(slow),
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "durapipe.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def labels(log: Path) -> Counter[str]:
    return Counter(line.split()[0] for line in lines(log))


@pytest.mark.slow
def test_ctrl_c_detaches_the_run_and_the_printed_command_resumes_it(
    database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    proc = durapipe("run", f"{TARGET}:steps", "--input", f"log={log}", "--run-id", "c1",
                    "--database-url", database_url)
    try:
        wait_for(lambda: "slow-start" in labels(log), timeout=60, what="the slow step")
        proc.send_signal(signal.SIGINT)
        out, errs = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, errs
    said = [ln for ln in errs.splitlines() if "detached" in ln]
    assert len(said) == 1 and "run c1 is still PENDING" in said[0], errs
    assert "Traceback" not in errs and "left PENDING for recovery" not in errs
    # nothing was recorded as failed: the run and its step are PENDING, not ERROR
    [(status, executor)] = sql(database_url, "SELECT status, executor_id FROM dbos.workflow_status "
                                             "WHERE workflow_uuid = 'c1'")
    assert status == "PENDING" and executor.startswith("run-"), (status, executor)
    assert sql(database_url, "SELECT count(*) FROM dbos.operation_outputs WHERE error IS NOT NULL") == [(0,)]

    command = re.search(r"`durapipe run (.+?)`", said[0])
    assert command is not None and f"--executor-id {executor}" in command.group(1)
    again = durapipe("run", *command.group(1).split(), "--json", "--database-url", database_url,
                     slow=0.1)
    out, errs = again.communicate(timeout=120)
    assert again.returncode == 0, errs
    assert '"status": "SUCCESS"' in out
    effects = labels(log)
    assert effects["first"] == 1 and effects["slow-end"] == 1 and effects["last"] == 1, effects
    assert effects["slow-start"] == 2  # the interrupted step ran again; nothing finished twice


def test_a_second_live_process_with_the_same_executor_id_is_warned(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    holder = App("ops-life", database_url, executor_id="same")
    other = App("ops-life", database_url, executor_id="same")
    fresh = App("ops-life", database_url, executor_id="other")
    from durapipe.engine.executors import ExecutorLock

    with holder, caplog.at_level(logging.WARNING, logger="durapipe"):
        assert fresh.running_executor_id == "other"
        lock = ExecutorLock(other.database_url, other.dbos_name, other.running_executor_id)
        assert not lock.acquire()
        assert "executor id 'same' of app 'ops-life' is held by another live process" in caplog.text
        caplog.clear()
        lock = ExecutorLock(fresh.database_url, fresh.dbos_name, fresh.running_executor_id)
        assert lock.acquire() and not caplog.text
        lock.release()
    # gone with its process: the id is free again
    lock = ExecutorLock(other.database_url, other.dbos_name, "same")
    assert lock.acquire()
    lock.release()


@pytest.mark.slow
def test_durapipe_run_never_touches_a_services_runs_and_recover_refuses_a_live_executor(
    database_url: str, tmp_path: Path
) -> None:
    log, cli_log = tmp_path / "log", tmp_path / "cli-log"
    app = lifecycle_app.app
    app.database_url = database_url
    with app:  # the "service": executor id local, a run in its slow step
        lifecycle_app.steps.start({"log": str(log)}, run_id="svc-1")
        wait_for(lambda: "slow-start" in labels(log), what="the service's slow step")
        proc = durapipe("run", f"{TARGET}:once", "--input", f"log={cli_log}", "--json",
                        "--database-url", database_url)
        out, errs = proc.communicate(timeout=120)
        assert proc.returncode == 0, errs
        time.sleep(1)
        assert labels(log) == Counter({"first": 1, "slow-start": 1})  # not re-executed
        [(executor,)] = sql(database_url, "SELECT executor_id FROM dbos.workflow_status "
                                          "WHERE workflow_uuid = 'svc-1'")
        assert executor == "local"
        with Admin(database_url) as admin:
            with pytest.raises(OperatorError, match="executor 'local' of app 'ops-life' is alive"):
                admin.recover(["local"])
            with pytest.raises(OperatorError, match="being executed by the live process"):
                admin.resume("svc-1")
        with pytest.raises(AppStateError, match="held by a live process"):
            app.recover(["local"])
        assert labels(log) == Counter({"first": 1, "slow-start": 1})
    with Admin(database_url) as admin:  # its process is gone now: recover may take its runs
        assert admin.recover(["local"]) == ["svc-1"]
