"""Configuration mistakes are loud and database errors are one line: unknown URL schemes,
``dbos-config.yaml``'s URL, a database DBOS creates, Postgres down or a wrong role, a
failed run's traceback logged once, an untested DBOS release, an embedded SQLite too old."""

from __future__ import annotations

import logging
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from dbutil import sql
from durapipe import App, NodeFailed, fn
from durapipe.audit import redact
from durapipe.engine import database, steps
from durapipe.errors import AppStateError, DatabaseError


def ok(state: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


def boom(state: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("boom")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("DURAPIPE_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("url", ["postgresq://u@h/db", "mysql://u@h/db", "sqlite:/x.db", "h/db", ""])
def test_an_unknown_url_scheme_is_refused_at_once(clean_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                  url: str) -> None:
    if url:
        with pytest.raises(AppStateError, match=r"neither postgresql://.* nor sqlite:///") as caught:
            App("cfg-app", url)
        assert "database_url=" in caught.value.message
    monkeypatch.setenv("DURAPIPE_DATABASE_URL", url or "postgresql:/one-slash")
    with pytest.raises(AppStateError, match="from DURAPIPE_DATABASE_URL"):
        App("cfg-app")


def test_dbos_config_yaml_names_the_database(clean_env: Path, monkeypatch: pytest.MonkeyPatch,
                                            database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    (clean_env / "dbos-config.yaml").write_text(
        "name: cfg-app\nlanguage: python\nsystem_database_url: ${CFG_TEST_DB}\n")
    monkeypatch.setenv("CFG_TEST_DB", database_url)
    app = App("cfg-app")
    assert app.database_url == database_url
    p = app.pipeline("p", fn(ok))
    caplog.set_level(logging.INFO, logger="durapipe")
    with app:
        p.run({}, run_id="cfg-1")
    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'cfg-1'") \
        == [("SUCCESS",)]
    assert f"app 'cfg-app' records to {redact(database_url)}" in caplog.text

    monkeypatch.delenv("CFG_TEST_DB")
    caplog.clear()
    app = App("cfg-app")
    assert app.database_url == "sqlite:///cfg_app.sqlite"
    with app:
        pass
    assert "names system_database_url ${CFG_TEST_DB}, which is empty here" in caplog.text


def test_a_database_dbos_creates_is_announced(pg_server_url: str, caplog: pytest.LogCaptureFixture) -> None:
    name = f"durapipe_typo_{uuid.uuid4().hex[:10]}"
    admin = make_url(pg_server_url).set(database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    url = make_url(pg_server_url).set(database=name).render_as_string(False)
    caplog.set_level(logging.INFO, logger="durapipe")
    app = App("typo-app", url)
    try:
        with app:
            pass
        assert f"app 'typo-app' created the database {redact(url)}, which did not exist" in caplog.text
        caplog.clear()
        with app:  # it exists now: nothing to announce
            pass
        assert "created the database" not in caplog.text
    finally:
        app.shutdown()
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("change", [{"port": 1}, {"username": "no_such_role", "password": "s3cret"}],
                         ids=["server-down", "wrong-role"])
def test_an_unreachable_database_is_one_durapipe_error(pg_server_url: str, make_app: Callable[..., App],
                                                       change: dict[str, Any]) -> None:
    url = make_url(pg_server_url).set(**change).render_as_string(False)
    app = App("down-app", url)
    app.pipeline("p", fn(ok))
    with pytest.raises(DatabaseError) as caught:
        with app:
            pass
    message = caught.value.message
    assert message.startswith("cannot reach database postgresql://") and "\n" not in message
    assert "s3cret" not in message and caught.value.__suppress_context__
    # Nothing was left half-launched: another app launches in this process.
    other = make_app("up-app")
    p = other.pipeline("p", fn(ok))
    with other:
        assert p.run({}).state == {"ok": True}


def test_a_failed_runs_traceback_is_logged_as_one_line(make_app: Callable[..., App],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURAPIPE_LOG_LEVEL", "WARNING")  # the CLI's tests quieten DBOS
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("dbos").addHandler(handler)
    try:
        app = make_app()
        p = app.pipeline("p", fn(boom))
        with app:
            with pytest.raises(NodeFailed, match="ValueError: boom"):
                p.run({}, run_id="boom-1")
    finally:
        logging.getLogger("dbos").removeHandler(handler)
    failed = [r for r in records if str(r.msg).startswith("Exception encountered in")]
    assert failed and all(r.exc_info is None and "ValueError: boom" in r.getMessage() for r in failed)


def test_an_untested_dbos_release_uses_dbos_step_path(make_app: Callable[..., App],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    assert steps.dbos_release() in steps.TESTED_DBOS  # the suite runs on a tested release
    monkeypatch.setattr(steps, "dbos_release", lambda: "3.5.0")
    app = make_app()
    p = app.pipeline("p", fn(ok))
    with app:
        assert app.step_log() is None
        assert p.run({}).state == {"ok": True}
    assert "DBOS 3.5.0 is installed, so step rows are written by DBOS.run_step" in caplog.text


@pytest.mark.parametrize(("python", "sqlite", "refused"), [
    ((3, 13), (3, 40, 1), True), ((3, 12), (3, 41, 2), True), ((3, 12), (3, 42, 0), False),
    ((3, 11), (3, 40, 1), False), ((3, 10), (3, 31, 1), False), ((3, 14), (3, 46, 0), False)])
def test_the_sqlite_default_needs_sqlite_3_42_on_python_3_12_and_later(
    python: tuple[int, int], sqlite: tuple[int, int, int], refused: bool
) -> None:
    problem = database.sqlite_problem(python, sqlite)
    assert (problem is not None) == refused
    if problem:
        assert "needs SQLite 3.42 or newer" in problem and "DURAPIPE_DATABASE_URL=postgresql://" in problem


def test_an_app_on_too_old_a_sqlite_refuses_to_launch_with_one_line(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database.sqlite3, "sqlite_version_info", (3, 40, 1))
    monkeypatch.setattr(database, "sys", types.SimpleNamespace(version_info=(3, 13, 0)))
    app = App("old-sqlite")
    with pytest.raises(DatabaseError, match=r"this Python links SQLite 3\.40\.1"):
        app.launch()
    assert not (clean_env / "old_sqlite.sqlite").exists()
