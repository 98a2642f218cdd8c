"""Two apps on one database whose names are prefixes of each other (``shop``, ``shop-eu``):
every app-scoped operation of one refuses the other's runs with UnknownRun, and nothing of
the victim's run changes; the victim's own app then answers its gate as usual."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dbutil import sql, wait_for
from durapipe import App, dispatch, fn, gate, join
from durapipe.cli import cli
from durapipe.engine import RunHandle
from durapipe.errors import UnknownGate, UnknownRun

S = dict[str, Any]
GATE = "payout"


def pay(state: S) -> S:
    return {"paid": True}


def audit(state: S) -> S:
    return {"audited": True}


def shop(app: App) -> Any:
    """The same pipeline (same name, same shape) in every app of the test."""
    return app.pipeline("pay", dispatch(fn(audit), names=["audit"]) >> gate(GATE, "Pay out?")
                        >> fn(pay) >> join("audit"))


def db_sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """``sql`` on Postgres, or the same query on the SQLite file (no schema there)."""
    if not url.startswith("sqlite:///"):
        return sql(url, query, *params)
    con = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        with con:
            return con.execute(query.replace("dbos.", "").replace("%s", "?"), params).fetchall()
    finally:
        con.close()


def snapshot(url: str, run_id: str) -> Any:
    """Everything of a run a cross-app write could change."""
    return (
        db_sql(url, "SELECT status, application_name FROM dbos.workflow_status WHERE workflow_uuid = %s",
            run_id),
        db_sql(url, "SELECT key, value FROM dbos.workflow_events WHERE workflow_uuid = %s ORDER BY key",
            run_id),
        db_sql(url, "SELECT count(*) FROM dbos.notifications WHERE destination_uuid = %s", run_id),
        db_sql(url, "SELECT count(*) FROM dbos.operation_outputs WHERE workflow_uuid = %s", run_id),
    )


def start_victim(make_app: Callable[..., App], url: str, name: str, run_id: str) -> None:
    victim = make_app(name)
    pipeline = shop(victim)
    with victim:
        pipeline.start({}, run_id=run_id)
        wait_for(lambda: bool(victim.pending(run_id)), what="the victim's gate")
    # As if the victim's worker were still running it (this process's shutdown ended it).
    db_sql(url, "UPDATE dbos.workflow_status SET status = 'PENDING' WHERE workflow_uuid = %s", run_id)


def attack(attacker: App, run_id: str) -> None:
    """Every app-scoped operation of ``attacker`` on ``run_id``: each is refused."""
    pipeline = attacker.registered("pay")
    refused = [
        lambda: attacker.get_run(run_id),
        lambda: asyncio.run(attacker.get_run_async(run_id)),
        lambda: attacker.approve(run_id, GATE, by="attacker"),
        lambda: attacker.reject(run_id, GATE, by="attacker", comment="no"),
        lambda: asyncio.run(attacker.approve_async(run_id, GATE, by="attacker")),
        lambda: asyncio.run(attacker.reject_async(run_id, GATE, by="attacker")),
        lambda: attacker.pending(run_id),
        lambda: asyncio.run(attacker.pending_async(run_id)),
        lambda: RunHandle(attacker, run_id).status(),
        lambda: RunHandle(attacker, run_id).result(timeout=5),
        lambda: asyncio.run(RunHandle(attacker, run_id).result_async(timeout=5)),
        lambda: RunHandle(attacker, run_id).progress("audit"),
        lambda: RunHandle(attacker, run_id).cancel(),
        lambda: asyncio.run(RunHandle(attacker, run_id).cancel_async()),
        lambda: asyncio.run(RunHandle(attacker, run_id).progress_async("audit")),
        lambda: shop_pipeline(attacker, pipeline.name).start({}, run_id=run_id),
        lambda: asyncio.run(shop_pipeline(attacker, pipeline.name).start_async({}, run_id=run_id)),
    ]
    for i, op in enumerate(refused):
        with pytest.raises(UnknownRun):
            op()
            pytest.fail(f"operation {i} was not refused")
    assert attacker.pending() == []


def answered(app: App, run_id: str) -> bool:
    try:
        app.approve(run_id, GATE, by="alice")
    except UnknownGate:
        return False
    return True


def shop_pipeline(app: App, name: str) -> Any:
    from durapipe import Pipeline

    return Pipeline(app, app.registered(name))


@pytest.fixture
def apps_on(any_database_url: str) -> Iterator[Callable[..., App]]:
    """Apps on this test's Postgres database, then on one SQLite file; shut down after."""
    made: list[App] = []

    def factory(name: str) -> App:
        made.append(App(name, any_database_url))
        return made[-1]

    yield factory
    for app in made:
        app.shutdown()


@pytest.mark.parametrize(("victim_name", "attacker_name"), [("shop-eu", "shop"), ("shop", "shop-eu")])
def test_an_app_cannot_read_or_answer_another_apps_runs(
    apps_on: Callable[..., App], any_database_url: str, victim_name: str, attacker_name: str
) -> None:
    make_app, database_url = apps_on, any_database_url
    run_id = f"{victim_name}-order-1"
    start_victim(make_app, database_url, victim_name, run_id)
    before = snapshot(database_url, run_id)

    attacker = make_app(attacker_name)
    shop(attacker)
    with attacker:
        attack(attacker, run_id)
    assert snapshot(database_url, run_id) == before

    victim = make_app(victim_name)
    shop(victim)
    with victim:
        # Recovery re-enqueues the run and its next execution announces the gate again;
        # until then the answer is refused (UnknownGate) and nothing changes.
        wait_for(lambda: answered(victim, run_id), timeout=60, what="the gate after recovery")
        state = victim.get_run(run_id).result(timeout=60).state
    assert state["paid"] is True and state[GATE]["by"] == "alice"


def test_a_run_without_an_owner_belongs_to_no_app(make_app: Callable[..., App],
                                                   database_url: str) -> None:
    start_victim(make_app, database_url, "shop-eu", "orphan-1")
    sql(database_url, "UPDATE dbos.workflow_status SET application_name = NULL "
                      "WHERE workflow_uuid = 'orphan-1'")
    before = snapshot(database_url, "orphan-1")
    attacker = make_app("shop")
    shop(attacker)
    with attacker:
        attack(attacker, "orphan-1")
    assert snapshot(database_url, "orphan-1") == before


def test_the_cli_with_app_answers_only_that_apps_runs(make_app: Callable[..., App],
                                                       database_url: str, tmp_path: Path) -> None:
    start_victim(make_app, database_url, "shop-eu", "eu-order-7")
    before = snapshot(database_url, "eu-order-7")
    module = tmp_path / "attacker_shop_app.py"
    module.write_text(textwrap.dedent("""
        from durapipe import App, dispatch, fn, gate, join

        def pay(state):
            return {"paid": True}

        def audit(state):
            return {"audited": True}

        app = App("shop")
        pay_pipeline = app.pipeline("pay", dispatch(fn(audit), names=["audit"])
                                    >> gate("payout", "Pay out?") >> fn(pay) >> join("audit"))
    """))
    res = CliRunner().invoke(cli, ["approve", "eu-order-7", GATE, "--by", "attacker", "--app",
                                   str(module), "--database-url", database_url])
    assert res.exit_code == 1, res.output
    assert "has no run with id 'eu-order-7'" in res.output and "Traceback" not in res.output
    shown = CliRunner().invoke(cli, ["show", "eu-order-7", "--app", str(module),
                                     "--database-url", database_url])
    assert shown.exit_code == 1 and "has no run with id 'eu-order-7'" in shown.output, shown.output
    assert snapshot(database_url, "eu-order-7") == before
    [(value,)] = sql(database_url, "SELECT value FROM dbos.workflow_events WHERE "
                                   "workflow_uuid = 'eu-order-7' AND key = %s", f"gate:{GATE}")
    assert json.loads(value)["status"] == "waiting"


def test_a_console_shows_and_changes_only_its_own_apps_runs(make_app: Callable[..., App],
                                                            database_url: str) -> None:
    from fastapi.testclient import TestClient

    from durapipe.web import create_console

    start_victim(make_app, database_url, "shop-eu", "eu-order-9")
    before = snapshot(database_url, "eu-order-9")
    attacker = make_app("shop")
    shop(attacker)
    auth = {"authorization": "Bearer alice-secret"}
    with attacker, TestClient(create_console(attacker, token="alice:alice-secret")) as client:
        shop_pipeline(attacker, "pay").start({}, run_id="shop-order-1")
        wait_for(lambda: bool(attacker.pending("shop-order-1")), what="the console app's own gate")
        listed = client.get("/").text
        assert "shop-order-1" in listed and "eu-order-9" not in listed
        assert "eu-order-9" not in client.get("/approvals").text
        assert "shop-order-1" in client.get("/approvals").text
        for url in ("/runs/eu-order-9", "/runs/eu-order-9/live", "/api/runs/eu-order-9"):
            assert client.get(url).status_code == 404, url
        for url, form in (("/runs/eu-order-9/cancel", None), ("/runs/eu-order-9/resume", None),
                          ("/runs/eu-order-9/fork", {"node": "0"}),
                          (f"/runs/eu-order-9/gates/{GATE}/approve", None),
                          (f"/runs/eu-order-9/gates/{GATE}/reject", None)):
            res = client.post(url, data=form, headers=auth, follow_redirects=False)
            assert res.status_code == 404, (url, res.status_code, res.text)
    assert snapshot(database_url, "eu-order-9") == before
    assert sql(database_url, "SELECT count(*) FROM dbos.workflow_status WHERE forked_from = "
                             "'eu-order-9'") == [(0,)]
