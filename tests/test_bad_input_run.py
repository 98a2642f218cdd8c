"""Bad run inputs and bad node outputs against a launched App on Postgres.

Non-JSON values, NaN, non-string keys, odd and huge keys and values, unicode (lone
surrogates and NUL included), wrong types. A refused start raises a StateError and leaves no
workflow row; an accepted one round-trips exactly; a node returning junk ends its run in
ERROR with a DurapipeError, recorded.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from dbutil import sql
from durapipe import App, DurapipeError, Pipeline, RunStatus, StateError, fn

TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # surrogates, NUL
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
NON_JSON = st.one_of(
    st.just(float("nan")), st.just(float("inf")), st.just({1, 2}), st.just(b"bytes"),
    st.just(dt.datetime(2024, 1, 1)), st.just(Decimal("1.5")), st.just(object()), st.just(len),
    st.just({1: "int key"}), st.just({("t",): 1}), st.just(complex(1, 2)),
)
VALUES = st.one_of(JSONISH, NON_JSON, st.lists(NON_JSON, min_size=1, max_size=2),
                   st.dictionaries(TEXT, NON_JSON, min_size=1, max_size=2))
INPUTS = st.one_of(
    st.dictionaries(TEXT, VALUES, max_size=5),
    st.one_of(st.integers(), TEXT, st.lists(st.integers(), max_size=2), st.just(object())),  # wrong type
)


def echo(state: dict[str, Any]) -> dict[str, Any]:
    return {"__echo": True}


OUTPUTS: dict[str, Any] = {}


def junk_out(state: dict[str, Any]) -> Any:
    return OUTPUTS[state["ref"]]


@pytest.fixture(scope="module")
def runner(pg_server_url: str) -> Iterator[tuple[str, Pipeline, Pipeline]]:
    name = f"durapipe_bad_{uuid.uuid4().hex[:10]}"
    admin = make_url(pg_server_url).set(database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_server_url).set(database=name).render_as_string(False)
    app = App("bad-input", url)
    echo_p = app.pipeline("echo", fn(echo))
    junk_p = app.pipeline("junk", fn(junk_out))
    try:
        with app:
            yield url, echo_p, junk_p
    finally:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def is_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_json(v) for k, v in value.items())
    return False


def acceptable(inputs: Any) -> bool:
    return inputs is None or (isinstance(inputs, dict) and is_json(inputs))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=INPUTS)
def test_run_inputs_are_stored_exactly_or_refused_before_anything_is_written(
    runner: tuple[str, Pipeline, Pipeline], inputs: Any
) -> None:
    url, echo_p, _ = runner
    run_id = f"in-{uuid.uuid4().hex}"
    try:
        result = echo_p.run(inputs, run_id=run_id, timeout=60)
    except StateError as exc:
        assert not acceptable(inputs), (inputs, exc)
        assert len(exc.message) > 20 and "inputs" in exc.message
        assert sql(url, "SELECT count(*) FROM dbos.workflow_status WHERE workflow_uuid = %s", run_id) == [(0,)]
        return
    assert acceptable(inputs), inputs
    assert result.status is RunStatus.SUCCESS
    assert result.state == {**(inputs or {}), "__echo": True}
    assert echo_p.app.get_run(run_id).result(timeout=60).state == result.state  # read back from Postgres


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES, shape=st.integers(min_value=0, max_value=2))
def test_a_node_returning_junk_fails_its_run_with_a_recorded_durapipe_error(
    runner: tuple[str, Pipeline, Pipeline], value: Any, shape: int
) -> None:
    url, _, junk_p = runner
    out = [value, {"k": value}, {"nested": {"deep": [value]}}][shape]
    run_id = f"out-{uuid.uuid4().hex}"
    OUTPUTS[run_id] = out
    handle = junk_p.start({"ref": run_id}, run_id=run_id)
    if out is None or (isinstance(out, dict) and is_json(out)):
        assert handle.result(timeout=60).state == {"ref": run_id, **(out or {})}
        return
    with pytest.raises(DurapipeError) as caught:
        handle.result(timeout=60)
    assert "0:junk_out" in caught.value.message, caught.value.message
    assert sql(url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", run_id) == [("ERROR",)]
    assert sql(url, "SELECT error IS NOT NULL FROM dbos.workflow_output WHERE workflow_uuid = %s",
               run_id) == [(True,)]


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.just(None))
def test_huge_values_and_keys_round_trip(runner: tuple[str, Pipeline, Pipeline], _: None) -> None:
    url, echo_p, _p = runner
    huge = {"x" * 10_000: "é" * 2_000_000, "list": list(range(100_000)), "\x00nul": "\x00",
            "🙂 key with spaces; DROP TABLE x; --": {"'": '"'}}
    result = echo_p.run(huge, run_id=f"huge-{uuid.uuid4().hex}", timeout=120)
    assert result.state == {**huge, "__echo": True}
