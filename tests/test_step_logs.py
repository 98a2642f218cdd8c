"""Logs and tracebacks per step: records a step's code logs are stored with the step
(bounded), a failed step keeps the file:line frames of the user's code, and `durapipe show`,
the console and the view durapipe.step_logs show them. On Postgres (durapipe's own step
writer) and on SQLite (DBOS.run_step)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dbutil import sql
from durapipe import App, Pipeline, fn
from durapipe.audit import install_views
from durapipe.cli import cli
from durapipe.engine.admin import Admin
from durapipe.engine.steplogs import MAX_RECORDS
from durapipe.web import create_console

log = logging.getLogger("myapp.steps")
log.setLevel(logging.INFO)


def chatty(state: dict[str, Any]) -> dict[str, Any]:
    log.info("fetched %d rows", 3)
    log.warning("row 2 looks odd")
    return {"rows": 3}


def quiet(state: dict[str, Any]) -> dict[str, Any]:
    return {"quiet": True}


def flood(state: dict[str, Any]) -> dict[str, Any]:
    for i in range(MAX_RECORDS + 50):
        log.info("line %d", i)
    return {"flooded": True}


def lookup(config: dict[str, Any]) -> Any:
    return config["missing"]  # the frame a reader needs


def fails(state: dict[str, Any]) -> dict[str, Any]:
    log.error("about to look up the key")
    return {"value": lookup({})}


RAISE_LINE = lookup.__code__.co_firstlineno + 1


def build(make: Callable[..., App], url: str) -> App:
    app = make("step-logs", database_url=url)
    app.pipeline("logs", fn(chatty) >> fn(quiet) >> fn(flood) >> fn(fails))
    return app


def test_logs_and_traceback_are_stored_with_the_step(make_app: Callable[..., App], any_database_url: str) -> None:
    app = build(make_app, any_database_url)
    with app:
        result = Pipeline(app, app.registered("logs")).start({}, run_id="logs-1")
        assert result.status().value in ("PENDING", "ERROR", "ENQUEUED")
        try:
            result.result(timeout=60)
        except Exception as exc:
            assert "KeyError" in str(exc)
    with Admin(any_database_url) as admin:
        tree = admin.tree("logs-1")
        logs = admin.step_logs(tree)
    assert set(logs) == {("logs-1", "0.0:chatty"), ("logs-1", "0.2:flood"), ("logs-1", "0.3:fails")}
    chat = logs[("logs-1", "0.0:chatty")]
    assert [(r["level"], r["logger"], r["message"]) for r in chat["records"]] == [
        ("INFO", "myapp.steps", "fetched 3 rows"), ("WARNING", "myapp.steps", "row 2 looks odd")]
    assert "traceback" not in chat
    flooded = logs[("logs-1", "0.2:flood")]["records"]
    assert len(flooded) == MAX_RECORDS and flooded[-1]["dropped"] == 50
    failed = logs[("logs-1", "0.3:fails")]
    assert failed["error"] == "KeyError: 'missing'"
    assert [r["message"] for r in failed["records"]] == ["about to look up the key"]
    frames = [(f["file"].rsplit("/", 1)[-1], f["line"], f["function"]) for f in failed["traceback"]]
    assert frames[-1] == ("test_step_logs.py", RAISE_LINE, "lookup")
    assert frames[-2][2] == "fails"
    assert all("/durapipe/" not in f["file"] and "/dbos/" not in f["file"] for f in failed["traceback"])

    res = CliRunner().invoke(cli, ["show", "logs-1", "--database-url", any_database_url],
                             env={"COLUMNS": "220"})
    assert res.exit_code == 0, res.output
    assert re.search(r"WARNING +myapp\.steps: row 2 looks odd", res.output)
    assert re.search(rf"at \S*test_step_logs\.py:{RAISE_LINE} in lookup", res.output)
    assert "(50 more records dropped)" in res.output


def test_step_logs_in_the_view_and_the_console(make_app: Callable[..., App], database_url: str) -> None:
    app = build(make_app, database_url)
    with app:
        handle = Pipeline(app, app.registered("logs")).start({}, run_id="logs-2")
        try:
            handle.result(timeout=60)
        except Exception:
            pass
        with TestClient(create_console(app)) as client:
            page = client.get("/runs/logs-2", headers={"accept": "text/html"}).text
    assert "myapp.steps: row 2 looks odd" in page
    assert re.search(rf"test_step_logs\.py:{RAISE_LINE} in lookup", page)
    install_views(database_url)
    rows = sql(database_url, "SELECT step_name, seq, level, message, error FROM durapipe.step_logs "
                             "WHERE run_id = 'logs-2' AND step_name <> '0.2:flood' ORDER BY step_name, seq")
    assert rows == [("0.0:chatty", 1, "INFO", "fetched 3 rows", None),
                    ("0.0:chatty", 2, "WARNING", "row 2 looks odd", None),
                    ("0.3:fails", 1, "ERROR", "about to look up the key", "KeyError: 'missing'")]
    frames = sql(database_url, "SELECT traceback->-1->>'function', (traceback->-1->>'line')::int "
                               "FROM durapipe.step_logs WHERE step_name = '0.3:fails'")
    assert frames == [("lookup", RAISE_LINE)]


def test_capturing_step_logs_keeps_pythons_default_output_of_warnings() -> None:
    """The capture handler sits on the root logger; an app that never configured logging
    still sees warnings on stderr, as Python prints them with no handler at all."""
    import subprocess
    import sys

    code = ("import logging, durapipe.engine.steplogs\n"
            "logging.getLogger('durapipe').warning('left PENDING: r-1')\n"
            "logging.getLogger('myapp.sub').error('boom')\n"
            "logging.getLogger('myapp').info('not shown')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["left PENDING: r-1", "boom"]


def test_a_retried_step_keeps_each_attempts_logs(make_app: Callable[..., App], database_url: str) -> None:
    """retries=2 is a durable policy: each attempt is a step of its own (0, 0#1, 0#2) with its
    own records, error and traceback, and the record bound holds per step."""
    calls: list[int] = []
    log = logging.getLogger("myapp.steps")

    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        n = len(calls)
        log.warning("try %d", n)
        for i in range(MAX_RECORDS + 5 if n == 2 else 0):  # the 2nd attempt overflows the bound
            log.info("noise %d", i)
        if n < 3:
            lookup({}) if n == 1 else log.error("giving up on try %d", n)
            raise RuntimeError(f"flaky {n}")
        return {"ok": n}

    app = make_app("step-logs", database_url=database_url)
    app.pipeline("retry", fn(flaky, retries=2))
    with app:
        assert Pipeline(app, app.registered("retry")).run({}, run_id="logs-3").state["ok"] == 3
    with Admin(database_url) as admin:
        logs = admin.step_logs(admin.tree("logs-3"))
    first, second, third = (logs["logs-3", step] for step in ("0:flaky", "0#1:flaky", "0#2:flaky"))
    assert [r["message"] for r in first["records"]] == ["try 1"]
    assert first["error"] == "KeyError: 'missing'" and first["traceback"][-1]["line"] == RAISE_LINE
    assert second["error"] == "RuntimeError: flaky 2" and len(second["records"]) == MAX_RECORDS
    assert second["records"][0]["message"] == "try 2"  # records past the bound are dropped
    assert [r["message"] for r in third["records"]] == ["try 3"] and "error" not in third

    res = CliRunner().invoke(cli, ["show", "logs-3", "--database-url", database_url], env={"COLUMNS": "220"})
    assert res.exit_code == 0, res.output
    for line in ("KeyError: 'missing'", "RuntimeError: flaky 2", "try 3"):
        assert line in res.output, res.output
    assert re.search(rf"at \S*test_step_logs\.py:{RAISE_LINE} in lookup", res.output)
    with TestClient(create_console(app)) as client:
        page = client.get("/runs/logs-3", headers={"accept": "text/html"}).text
    assert "KeyError: &#x27;missing&#x27;" in page or "KeyError: 'missing'" in page
    assert "try 3" in page
    install_views(database_url)
    rows = sql(database_url, "SELECT node_path, message, error FROM durapipe.step_logs "
                             "WHERE run_id = 'logs-3' AND message LIKE '%%try%%' ORDER BY node_path, seq")
    assert rows == [("0", "try 1", "KeyError: 'missing'"), ("0#1", "try 2", "RuntimeError: flaky 2"),
                    ("0#2", "try 3", None)]
