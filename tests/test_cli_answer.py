"""`durapipe approve` / `reject` without `--app`: a gate is answered from the database alone,
as the run's own app, with the gate's approver check; no App is launched for it. (An answer
given while the run's worker is dead, SIGKILLed, and the resumed run going on from it:
`test_control_crash.py`.)"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dbutil import sql, wait_for
from durapipe import App, fn, gate, map_over
from durapipe.cli import cli
from durapipe.web import create_console

S = dict[str, Any]


def publish(state: S) -> S:
    return {"published": True}


def review(app: App) -> Any:
    return app.pipeline("review", gate("legal", "Publish {title}?", approvers=["alice"]) >> fn(publish))


def durapipe(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200", **(env or {})})


def gate_event(url: str, run_id: str) -> Any:
    [(value,)] = sql(url, "SELECT value FROM dbos.workflow_events WHERE workflow_uuid = %s "
                          "AND key = 'gate:legal'", run_id)
    return json.loads(value)


def test_approve_without_app_answers_as_the_runs_own_app(make_app: Callable[..., App],
                                                         database_url: str) -> None:
    app = make_app("press-desk")
    pipeline = review(app)
    each = app.pipeline("each", map_over("titles", gate("check", "Check {item}?"), "checks"))
    with app:
        handle = pipeline.start({"title": "T"}, run_id="cli-ans-1")
        wait_for(lambda: bool(app.pending("cli-ans-1")), what="the gate")
        shown = durapipe("show", "cli-ans-1", "--database-url", database_url)
        assert ("answer: durapipe approve cli-ans-1 legal --by alice --database-url "
                f"{shlex.quote(database_url)}") in shown.output, shown.output

        refusals = {
            ("--by", "mallory"): "'mallory' may not answer gate 'legal'",  # the gate's approvers
            ("--by", "alice", "--database-url", ""): "no database given",
            ("--by", "alice", "--run", "nope"): "no durapipe run with id 'nope'",
            ("--by", "alice", "--gate", "budget"): "is waiting at ['legal']",
        }
        for args, why in refusals.items():
            run_id = args[3] if "--run" in args else "cli-ans-1"
            gate_name = args[3] if "--gate" in args else "legal"
            url = args[3] if "--database-url" in args else database_url
            res = durapipe("approve", run_id, gate_name, *args[:2], env={"DURAPIPE_DATABASE_URL": url})
            assert res.exit_code == 1 and why in res.output, (args, res.output)
            assert "Traceback" not in res.output
        # A run whose row names no app belongs to none: nothing answers its gates.
        sql(database_url, "UPDATE dbos.workflow_status SET application_name = NULL "
                          "WHERE workflow_uuid = 'cli-ans-1'")
        orphan = durapipe("approve", "cli-ans-1", "legal", "--by", "alice", "--database-url", database_url)
        assert orphan.exit_code == 1 and "records no app" in orphan.output, orphan.output
        sql(database_url, "UPDATE dbos.workflow_status SET application_name = 'press-desk' "
                          "WHERE workflow_uuid = 'cli-ans-1'")
        assert gate_event(database_url, "cli-ans-1")["status"] == "waiting"

        # The command app.pending printed, with the database from the environment.
        done = durapipe("approve", "cli-ans-1", "legal", "--by", "alice", "--comment", "ship it",
                        env={"DURAPIPE_DATABASE_URL": database_url})
        assert done.exit_code == 0, done.output
        assert "approved gate 'legal' of run cli-ans-1 by alice" in done.output
        state = handle.result(timeout=30).state
        assert state["published"] is True and state["legal"]["by"] == "alice"
        assert state["legal"]["comment"] == "ship it"
        again = durapipe("reject", "cli-ans-1", "legal", "--by", "alice", "--database-url", database_url)
        assert again.exit_code == 1 and "already approved by 'alice'" in again.output

        # Two items wait at gate 'check': the run id alone is ambiguous; each has its own id.
        many = each.start({"titles": ["a", "b"]}, run_id="cli-ans-map")
        wait_for(lambda: len(app.pending("cli-ans-map")) == 2, what="both items' gates")
        vague = durapipe("approve", "cli-ans-map", "check", "--by", "bob", "--database-url", database_url)
        assert vague.exit_code == 1 and "waits at gate 'check' in 2 places" in vague.output, vague.output
        # The console's run page offers each item's gate, and answers the one it names.
        with TestClient(create_console(app, token="bob:b-secret")) as console:
            page = console.get("/runs/cli-ans-map").text
            waiting = re.findall(r'data-workflow="(cli-ans-map/[^"]+)"', page)
            assert len(waiting) == 2 and "durapipe approve" in page, page
            auth = {"authorization": "Bearer b-secret"}
            elsewhere = console.post("/runs/cli-ans-1/gates/check/approve", data={"workflow": waiting[0]},
                                     headers=auth, follow_redirects=False)
            assert elsewhere.status_code == 400  # a workflow of another run: refused
            done_one = console.post("/runs/cli-ans-map/gates/check/approve", data={"workflow": waiting[0]},
                                    headers=auth, follow_redirects=False)
            assert done_one.status_code == 303, done_one.text
        listed = durapipe("pending", "--database-url", database_url)
        commands = [line.split("answer: ", 1)[1].split("   (")[0] for line in listed.output.splitlines()
                    if line.startswith("answer: durapipe approve 'cli-ans-map/")]
        assert len(commands) == 1 and waiting[1] in commands[0], listed.output
        for command in commands:  # as printed, with the name of who answers filled in
            res = CliRunner().invoke(cli, shlex.split(command.replace("--by NAME", "--by bob"))[1:])
            assert res.exit_code == 0 and "approved gate 'check'" in res.output, (command, res.output)
        assert many.result(timeout=30).status.value == "SUCCESS"


def test_on_an_untested_dbos_release_answers_take_dbos_public_calls(
        make_app: Callable[..., App], database_url: str, monkeypatch: Any) -> None:
    from durapipe.engine import gates
    from durapipe.engine.admin import Admin
    from durapipe.errors import ApprovalRefused, UnknownGate

    monkeypatch.setattr(gates, "dbos_release", lambda: "99.0.0")  # no private tables touched
    app = make_app("press-desk")
    pipeline = review(app)
    with app:
        handle = pipeline.start({"title": "T"}, run_id="cli-ans-pub")
        wait_for(lambda: bool(app.pending("cli-ans-pub")), what="the gate")
        with Admin(database_url) as admin:
            try:
                admin.answer("cli-ans-pub", "legal", "approved", "mallory")
                raise AssertionError("mallory answered")
            except ApprovalRefused:
                pass
            assert gate_event(database_url, "cli-ans-pub")["status"] == "waiting"
            assert admin.answer("cli-ans-pub", "legal", "approved", "alice", "ok") == "cli-ans-pub"
            try:  # the same request again: dropped, or refused once the run recorded the first
                admin.answer("cli-ans-pub", "legal", "rejected", "alice")
            except UnknownGate:
                pass
        state = handle.result(timeout=30).state
    assert state["legal"]["by"] == "alice" and state["legal"]["comment"] == "ok"
    assert gate_event(database_url, "cli-ans-pub")["status"] == "approved"
