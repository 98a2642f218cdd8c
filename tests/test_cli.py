"""The durapipe CLI end to end on Postgres: run, runs, show, fork, cancel, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dbutil import lines, wait_for
from durapipe.cli import cli
from ops import blog_app

APP_FILE = str(Path(__file__).parent / "ops" / "blog_app.py")
runner = CliRunner()


def invoke(*args: str) -> Any:
    return runner.invoke(cli, list(args), catch_exceptions=False)


def durapipe(*args: str) -> subprocess.CompletedProcess[str]:
    """The real script in its own process (commands that launch an App configure logging)."""
    return subprocess.run([sys.executable, "-m", "durapipe.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_run_then_runs_and_show(database_url: str) -> None:
    proc = durapipe("run", f"{APP_FILE}:publish", "--input", "topic=durable AI", "--run-id", "cli-1",
                    "--database-url", database_url)
    assert proc.returncode == 0, proc.stderr
    assert "writer" in proc.stdout and "SUCCESS" in proc.stdout and '"done": true' in proc.stdout
    assert "nodes done" in proc.stderr  # the live view

    proc = durapipe("run", f"{APP_FILE}:broken", "--run-id", "cli-2", "--database-url", database_url)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: run cli-2 ERROR: NodeFailed: node 0:explode failed: ValueError: no luck today")
    assert "Traceback" not in proc.stderr

    res = invoke("runs", "--json", "--database-url", database_url)
    rows = json.loads(res.output)
    assert [(r["run_id"], r["pipeline"], r["status"]) for r in rows] == [
        ("cli-2", "broken", "ERROR"), ("cli-1", "publish", "SUCCESS")]
    res = invoke("runs", "--status", "error", "--pipeline", "broken", "--since", "1h", "--json",
                 "--database-url", database_url)
    assert [r["run_id"] for r in json.loads(res.output)] == ["cli-2"]
    assert invoke("runs", "--pipeline", "nothing", "--json", "--database-url", database_url).output.strip() == "[]"

    res = invoke("show", "cli-1", "--json", "--database-url", database_url)
    tree = json.loads(res.output)
    top = [(n["path"], n["name"], n["kind"], n["status"]) for n in tree["nodes"]]
    assert top == [("0.0", "writer", "step", "SUCCESS"), ("0.1.0", "editor", "step", "SUCCESS"),
                   ("0.1.1.0", "count", "step", "SUCCESS"), ("0.1.1.1", "double", "step", "SUCCESS"),
                   ("0.2", "finish", "step", "SUCCESS")]  # a fixed-shape branch: parent's steps
    assert (tree["nodes"][0]["model"], tree["nodes"][0]["input_tokens"]) == ("fake", 2)
    res = invoke("show", "cli-2", "--database-url", database_url)
    assert res.exit_code == 0 and "explode" in res.output and "no luck today" in res.output


@pytest.mark.parametrize("args, message", [
    (["show", "no-such-run"], "no durapipe run with id 'no-such-run'"),
    (["run", "no_such_module:p"], "cannot import module 'no_such_module'"),
    (["run", "missing/file.py:p"], "no such file"),
    (["run", f"{APP_FILE}:nope"], "has no pipeline 'nope'"),
    (["run", f"{APP_FILE}:publish", "--input", "novalue"], "use key=value"),
    (["fork", "no-such-run", "--from", "0.1"], "no durapipe run"),
    (["runs", "--since", "yesterday"], "use an age like 30m"),
    (["runs", "--status", "weird"], "--status 'weird'"),
])
def test_bad_input_is_one_line_and_exit_1(database_url: str, args: list[str], message: str) -> None:
    blog_app.app.database_url = database_url
    with blog_app.app:  # creates the DBOS tables
        pass
    res = runner.invoke(cli, [*args, "--database-url", database_url])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_unreachable_database_and_no_database() -> None:
    res = runner.invoke(cli, ["runs", "--database-url", "postgresql://nobody@127.0.0.1:9/none"])
    assert res.exit_code == 1 and res.output.startswith("error: cannot reach database")
    res = runner.invoke(cli, ["runs"], env={"DURAPIPE_DATABASE_URL": ""})
    assert res.exit_code == 1 and "no database given" in res.output


def test_fork_from_a_node_keeps_earlier_results(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    app = blog_app.app
    app.database_url = database_url
    try:
        with app:
            blog_app.publish.run({"topic": "x", "log": str(log)}, run_id="f1")
            assert lines(log) == ["finish"]
            calls = len(app.model.calls)
            res = invoke("fork", "f1", "--from", "finish", "--json", "--database-url", database_url)
            assert res.exit_code == 0, res.output
            new_id = json.loads(res.output)["run_id"]
            state = app.get_run(new_id).result(timeout=30).state
            assert state["done"] is True and state["draft"] == "a post on x"
            assert lines(log) == ["finish", "finish"]  # only the forked node ran again
            assert len(app.model.calls) == calls  # no model call paid twice
            res = invoke("fork", "f1", "--from", "0.9", "--database-url", database_url)
            assert res.exit_code == 1 and "recorded no step at node '0.9'" in res.output
    finally:
        app.shutdown()


def test_cancel_then_resume(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    app = blog_app.app
    app.database_url = database_url
    blog_app.release.clear()
    try:
        with app:
            handle = blog_app.hold.start({"log": str(log)}, run_id="h1")
            wait_for(lambda: lines(log) == ["hold-start"], what="step started")
            assert invoke("cancel", "h1", "--database-url", database_url).exit_code == 0
            assert handle.status().value == "CANCELLED"
            res = invoke("resume", "h1", "--database-url", database_url)
            assert res.exit_code == 0, res.output
            blog_app.release.set()
            assert app.get_run("h1").result(timeout=30).state["done"] is True
            res = invoke("resume", "h1", "--database-url", database_url)
            assert res.exit_code == 1 and "finished with SUCCESS" in res.output
    finally:
        blog_app.release.set()
        app.shutdown()


def test_sql_print_and_install(database_url: str) -> None:
    res = invoke("sql", "print")
    assert "CREATE OR REPLACE VIEW durapipe.steps" in res.output
    res = runner.invoke(cli, ["sql", "install", "--database-url", database_url])
    assert res.exit_code == 1 and "no DBOS tables" in res.output
    blog_app.app.database_url = database_url
    with blog_app.app:
        pass
    res = invoke("sql", "install", "--database-url", database_url)
    assert res.exit_code == 0 and "durapipe.{runs" in res.output
