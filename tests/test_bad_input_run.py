"""Bad run inputs and bad node outputs against a launched App on Postgres.

Non-JSON values, NaN, non-string keys, odd and huge keys and values, unicode (lone
surrogates and NUL included), deep nesting, wrong types. A refused start raises a StateError
and leaves no workflow row; an accepted one round-trips exactly and reads back as jsonb; a
node returning junk ends its run in ERROR with a StateError naming the node, recorded in the
step's row and the run's. The values that once slipped through are pinned as ``@example``
cases, and the examples hypothesis adds are the same on every run (``tests/conftest.py``).
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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from dbutil import sql
from durapipe import App, Pipeline, RunStatus, StateError, fn
from durapipe.state import MAX_DEPTH, MAX_INT_DIGITS

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


def storable_text(text: str) -> bool:
    """Text Postgres reads back as jsonb: no NUL, no lone surrogate."""
    return "\x00" not in text and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def is_json(value: Any, depth: int = 0) -> bool:
    """``depth`` counts the containers around ``value`` below the top-level dict."""
    if isinstance(value, (list, dict)) and depth > MAX_DEPTH:
        return False
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) < 10**MAX_INT_DIGITS
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(is_json(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and storable_text(k) and is_json(v, depth + 1)
                   for k, v in value.items())
    return False


def nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


def acceptable(inputs: Any) -> bool:
    return inputs is None or (isinstance(inputs, dict) and is_json(inputs))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=INPUTS)
@example(inputs={"\ud800": None})
@example(inputs={"k": "a\udfffb"})
@example(inputs={"k": "\x00"})
@example(inputs={"\x00": 1})
@example(inputs={"k": nested(MAX_DEPTH - 1)})
@example(inputs={"k": 10**5000})
@example(inputs={"k": 10**MAX_INT_DIGITS - 1})
@example(inputs={"k": -(10**300)})
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
    for table, column in [("workflow_input", "inputs"), ("workflow_output", "output"),
                          ("operation_outputs", "output")]:
        assert sql(url, f"SELECT count(*) FROM dbos.{table} WHERE workflow_uuid = %s "
                        f"AND {column}::jsonb IS NOT NULL", run_id) == [(1,)], table


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES, shape=st.integers(min_value=0, max_value=2))
@example(value={"\ud800": None}, shape=0)
@example(value="\ud800", shape=1)
@example(value="nul\x00", shape=2)
@example(value=10**5000, shape=1)
def test_a_node_returning_junk_fails_its_run_with_a_recorded_state_error(
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
    with pytest.raises(StateError) as caught:
        handle.result(timeout=60)
    assert caught.value.message.startswith("0:junk_out: "), caught.value.message
    # The step's row records the error: a replay raises it again without running the body.
    assert sql(url, "SELECT function_name, output IS NULL, error IS NOT NULL FROM dbos.operation_outputs "
                    "WHERE workflow_uuid = %s", run_id) == [("0:junk_out", True, True)]
    assert sql(url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", run_id) == [("ERROR",)]
    assert sql(url, "SELECT error IS NOT NULL FROM dbos.workflow_output WHERE workflow_uuid = %s",
               run_id) == [(True,)]


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.just(None))
def test_huge_values_and_keys_round_trip(runner: tuple[str, Pipeline, Pipeline], _: None) -> None:
    url, echo_p, _p = runner
    huge = {"x" * 10_000: "é" * 2_000_000, "list": list(range(100_000)), "big": 10**4000,
            "🙂 key with spaces; DROP TABLE x; --": {"'": '"'}, "ctl": "\x01\x1f\u2028"}
    result = echo_p.run(huge, run_id=f"huge-{uuid.uuid4().hex}", timeout=120)
    assert result.state == {**huge, "__echo": True}


def test_deep_nesting_is_refused_with_the_node_and_key(runner: tuple[str, Pipeline, Pipeline]) -> None:
    """5,000 levels (past Python's recursion limit) in an input and in a node's output."""
    url, echo_p, junk_p = runner
    with pytest.raises(StateError, match=r"inputs: state key 'k.deep.*levels deep"):
        echo_p.run({"k": {"deep": nested(5_000)}}, run_id="deep-in")
    assert sql(url, "SELECT count(*) FROM dbos.workflow_status WHERE workflow_uuid = 'deep-in'") == [(0,)]
    OUTPUTS["deep-out"] = {"k": nested(5_000)}
    with pytest.raises(StateError, match=r"0:junk_out: state key 'k\[0\].*levels deep") as caught:
        junk_p.run({"ref": "deep-out"}, run_id="deep-out")
    assert caught.value.data["node"] == "0:junk_out"
