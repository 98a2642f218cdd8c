"""Hostile run ids, gate names, approvers, comments, state values and errors through start,
steps, approve and the CLI: only DurapipeError subclasses (or one clean CLI line) come out,
never a raw driver error, and every row left in the database reads back as jsonb.
The cases that once escaped are pinned as ``@example``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from dbutil import sql, wait_for
from durapipe import App, BuildError, DurapipeError, NodeFailed, Pipeline, StateError, fn, gate
from durapipe.cli import cli
from durapipe.errors import UnknownRun
from test_bad_input_run import nested

TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)  # surrogates, NUL
RUN_IDS = st.one_of(TEXT, st.integers(), st.binary(max_size=4), st.none(), st.floats(),
                    st.text(min_size=190, max_size=400))
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON_COLUMNS = [("workflow_input", "inputs"), ("workflow_output", "output"),
                ("workflow_output", "error"), ("operation_outputs", "output"),
                ("operation_outputs", "error"), ("workflow_events", "value"),
                ("workflow_events_history", "value"), ("notifications", "message")]


def echo(state: dict[str, Any]) -> dict[str, Any]:
    return {"echoed": True}


class NoStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


RAISES: dict[str, Any] = {}


def raiser(state: dict[str, Any]) -> dict[str, Any]:
    """Raise the exception registered for this run, or return the value as key ``k``."""
    item = RAISES[state["ref"]]
    if isinstance(item, BaseException):
        raise item
    return {"k": item}


@pytest.fixture(scope="module")
def env(pg_server_url: str) -> Iterator[tuple[str, App, Pipeline, Pipeline, Pipeline, str]]:
    name = f"durapipe_ids_{uuid.uuid4().hex[:10]}"
    admin = make_url(pg_server_url).set(database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_server_url).set(database=name).render_as_string(False)
    app = App("bad-ids", url)
    echo_p = app.pipeline("echo", fn(echo))
    gated = app.pipeline("gated", gate("legal", "ok?") >> fn(echo))
    raising = app.pipeline("raising", fn(raiser))
    try:
        with app:
            gated.start({}, run_id="waiting-1")
            wait_for(lambda: bool(app.pending("waiting-1")), what="the gate")
            yield url, app, echo_p, gated, raising, "waiting-1"
    finally:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def all_rows_read_as_jsonb(url: str) -> None:
    for table, column in JSON_COLUMNS:
        # The cast fails (and so does the query) if any row cannot be read as jsonb.
        where = "" if table.startswith("workflow_") and table[9:] in ("input", "output") else \
            " WHERE serialization = 'portable_json'"
        sql(url, f"SELECT count({column}::jsonb) FROM dbos.{table}{where}")


def valid_id(run_id: Any) -> bool:
    return (isinstance(run_id, str) and 0 < len(run_id) <= 200 and "\x00" not in run_id
            and not any(0xD800 <= ord(c) <= 0xDFFF for c in run_id))


@SETTINGS
@given(run_id=RUN_IDS)
@example(run_id=42)
@example(run_id="x" * 10_000)
@example(run_id="nul\x00id")
@example(run_id="\ud800")
@example(run_id="")
@example(run_id=b"bytes")
@example(run_id=float("nan"))
def test_run_ids_are_checked_before_anything_is_written(env: Any, run_id: Any) -> None:
    url, app, echo_p, _, _, _ = env
    before = sql(url, "SELECT count(*) FROM dbos.workflow_status")
    if valid_id(run_id):
        run_id = f"{run_id}-{uuid.uuid4().hex[:8]}"[-200:]
        assert echo_p.run({}, run_id=run_id, timeout=60).state == {"echoed": True}
        assert app.get_run(run_id).status().finished
    else:
        if run_id is not None:  # None: start generates an id
            with pytest.raises(DurapipeError, match="run id"):
                echo_p.start({}, run_id=run_id)
        lookups = [lambda: app.get_run(run_id), lambda: app.approve(run_id, "legal", by="alice")]
        if run_id is not None:  # pending(None): the gates of every run
            lookups.append(lambda: app.pending(run_id))
        for lookup in lookups:
            with pytest.raises(UnknownRun, match="run id"):
                lookup()
        assert sql(url, "SELECT count(*) FROM dbos.workflow_status") == before
    all_rows_read_as_jsonb(url)


@SETTINGS
@given(gate_name=TEXT, by=st.one_of(TEXT, st.integers(), st.none()),
       comment=st.one_of(st.none(), TEXT, st.integers()))
@example(gate_name="legal\x00", by="alice", comment=None)
@example(gate_name="legal", by="mallory\x00", comment=None)
@example(gate_name="legal", by="\udc80", comment=None)
@example(gate_name="legal", by="alice", comment="ok\x00")
@example(gate_name="legal", by="alice", comment="\ud800")
@example(gate_name="legal", by="alice", comment="x" * 20_000)
@example(gate_name="x" * 10_000, by="alice", comment=None)
@example(gate_name="legal", by=7, comment=None)
def test_hostile_gate_names_approvers_and_comments_change_nothing(
    env: Any, gate_name: str, by: Any, comment: Any
) -> None:
    url, app, _, _, _, waiting = env
    if gate_name == "legal" and isinstance(by, str) and by and valid_id(by) and (
            comment is None or (isinstance(comment, str) and len(comment) <= 10_000
                                and valid_id(comment or "c"))):
        by = 7  # a valid answer would end the waiting run this test probes
    with pytest.raises(DurapipeError):
        app.approve(waiting, gate_name, by=by, comment=comment)
    assert [g.gate for g in app.pending(waiting)] == ["legal"]
    all_rows_read_as_jsonb(url)


@pytest.mark.parametrize("exc", [NoStr(), ValueError("nul\x00here"), KeyError("\ud800"),
                                 OSError(5, "lone \udfff")], ids=["no-str", "nul", "surrogate", "oserror"])
def test_an_error_with_unprintable_text_names_the_node_and_its_type(env: Any, exc: Exception) -> None:
    url, _, _, _, raising, _ = env
    run_id = f"raise-{uuid.uuid4().hex[:8]}"
    RAISES[run_id] = exc
    with pytest.raises(NodeFailed) as caught:
        raising.run({"ref": run_id}, run_id=run_id, timeout=60)
    name = type(exc).__name__
    assert caught.value.data["node"] == "0:raiser"
    assert f"node 0:raiser failed: {name}: " in caught.value.message, caught.value.message
    [(error,)] = sql(url, "SELECT error::jsonb FROM dbos.operation_outputs WHERE workflow_uuid = %s "
                          "AND function_name = '0:raiser'", run_id)
    assert error["name"] == name
    all_rows_read_as_jsonb(url)


@pytest.mark.parametrize("value", ["nul\x00", "\ud800", nested(5_000), 10**5000, float("nan")],
                         ids=["nul", "surrogate", "deep", "huge-int", "nan"])
def test_a_step_returning_hostile_state_records_a_state_error_on_its_step(env: Any, value: Any) -> None:
    url, _, _, _, raising, _ = env
    run_id = f"out-{uuid.uuid4().hex[:8]}"
    RAISES[run_id] = value
    with pytest.raises(StateError) as caught:
        raising.run({"ref": run_id}, run_id=run_id, timeout=60)
    assert caught.value.data["node"] == "0:raiser" and caught.value.data["key"].startswith("k")
    [(error,)] = sql(url, "SELECT error::jsonb FROM dbos.operation_outputs WHERE workflow_uuid = %s "
                          "AND function_name = '0:raiser'", run_id)
    assert error["name"] == "StateError" and "0:raiser" in error["message"]
    all_rows_read_as_jsonb(url)


@SETTINGS
@given(run_id=TEXT)
@example(run_id="x" * 10_000)
@example(run_id="nul\x00")
@example(run_id="\udcff")
def test_the_cli_refuses_hostile_run_ids_with_one_line(env: Any, run_id: str) -> None:
    url = env[0]
    if valid_id(run_id):
        run_id = run_id + "\x00"
    for args in (["show", run_id], ["cancel", run_id], ["resume", run_id],
                 ["fork", run_id, "--from", "0"], ["pending", "--run", run_id]):
        res = CliRunner().invoke(cli, [*args, "--database-url", url])
        assert res.exit_code == 1, (args, res.output)
        assert res.output.startswith("error:") and "Traceback" not in res.output, res.output
        assert "run id" in res.output and "SELECT" not in res.output
    all_rows_read_as_jsonb(url)


@settings(max_examples=60, deadline=None)
@given(name=TEXT, message=TEXT, approver=TEXT)
@example(name="le\x00gal", message="ok?", approver="alice")
@example(name="legal", message="ok \ud800?", approver="alice")
@example(name="legal", message="ok?", approver="al\x00ice")
def test_gate_and_node_names_the_database_cannot_store_are_refused_at_registration(
    name: str, message: str, approver: str
) -> None:
    app = App("build-only", "postgresql://nobody@localhost/never")
    storable = all(valid_id(t or "x") for t in (name, message, approver))
    try:
        app.pipeline("p", gate(name, message.replace("{", "").replace("}", ""), approvers=[approver])
                     >> fn(echo, name=name or "echo"))
    except BuildError as exc:
        assert not storable or not name or not approver, exc
        return
    assert storable


@pytest.mark.parametrize("executor", ["w\x00", "\ud800", "", "x" * 300])
def test_the_cli_refuses_hostile_executor_ids_with_one_line(env: Any, executor: str) -> None:
    res = CliRunner().invoke(cli, ["recover", executor, "--database-url", env[0]])
    assert res.exit_code == 1 and res.output.startswith("error:"), res.output
    assert "executor id" in res.output and "Traceback" not in res.output
