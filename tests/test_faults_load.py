"""Load and failure isolation: 200 concurrent runs of a mixed pipeline, and a step that
always fails next to healthy runs."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from dbutil import sql
from durapipe import Agent, App, FakeModel, NodeFailed, RunStatus, fn, transform

RUNS = 200


def stamp(state: dict[str, Any]) -> dict[str, Any]:
    return {"stamped": state["i"]}


async def double(state: dict[str, Any]) -> dict[str, Any]:
    return {"doubled": state["i"] * 2}


def finish(state: dict[str, Any]) -> dict[str, Any]:
    return {"total": state["stamped"] + state["doubled"] + len(state["a"]) + state["n"]}


def connections(url: str) -> int:
    db = url.rsplit("/", 1)[1].split("?")[0]
    return int(sql(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", db)[0][0])


@pytest.mark.slow
def test_two_hundred_concurrent_mixed_runs(database_url: str) -> None:
    app = App("load-app", database_url, model=FakeModel(lambda r: r.prompt.upper()))
    pipeline = app.pipeline(
        "mixed",
        fn(stamp)
        >> transform(lambda s: {"n": s["i"] + 1}, name="inc")
        >> (Agent("a").instruct("a{i}") | fn(double) | (fn(stamp, name="again") >> Agent("b").instruct("b{n}")))
        >> fn(finish),
    )
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(connections(database_url))
            time.sleep(0.05)

    with app:
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            handles = [pipeline.start({"i": i}, run_id=f"load-{i}") for i in range(RUNS)]
            results = [h.result(timeout=300) for h in handles]
        finally:
            done.set()
            sampler.join()
    assert all(r.status is RunStatus.SUCCESS for r in results)
    assert [r.state["total"] for r in results] == [i + 2 * i + len(f"A{i}") + i + 1 for i in range(RUNS)]
    # Every run numbered its steps the same way, however the 200 interleaved: six
    # (number, name) pairs, each in every run once.
    numbering = sql(database_url, """
        SELECT function_id, function_name, count(*) FROM dbos.operation_outputs
        WHERE function_name LIKE '0%:%' GROUP BY 1, 2 ORDER BY 1""")
    assert len(numbering) == 6 and {n for _, _, n in numbering} == {RUNS}, numbering
    assert sql(database_url, """
        SELECT workflow_uuid, function_name, count(*) FROM dbos.operation_outputs
        WHERE function_name LIKE '0%:%' GROUP BY 1, 2 HAVING count(*) > 1""") == []
    # 6 steps, all in the run itself: the two-step branch runs at reserved step numbers.
    assert sql(database_url, "SELECT count(*) FROM dbos.operation_outputs "
                             "WHERE function_name LIKE '0%:%'") == [(RUNS * 6,)]
    assert sql(database_url, "SELECT status, count(*) FROM dbos.workflow_status GROUP BY 1") == [
        ("SUCCESS", RUNS)]
    # Connections stay bounded by DBOS's pools (system database pool + listener + a few
    # background threads), however many runs are in flight.
    assert len(samples) >= 3 and max(samples) <= 30, samples


def flaky_forever(state: dict[str, Any]) -> None:
    raise ConnectionError(f"upstream down for {state['i']}")


def healthy(state: dict[str, Any]) -> dict[str, Any]:
    return {"ok": state["i"]}


@pytest.mark.slow
def test_a_step_that_always_fails_ends_its_run_in_error_and_spares_the_rest(database_url: str) -> None:
    app = App("fail-app", database_url)
    bad = app.pipeline("bad", fn(healthy) >> fn(flaky_forever, retries=2))
    good = app.pipeline("good", fn(healthy) >> fn(healthy, name="again"))
    with app:
        bad_handle = bad.start({"i": 7}, run_id="bad-7")
        good_handles = [good.start({"i": i}, run_id=f"good-{i}") for i in range(20)]
        with pytest.raises(NodeFailed) as caught:
            bad_handle.result(timeout=60)
        goods = [h.result(timeout=60) for h in good_handles]
        assert bad_handle.status() is RunStatus.ERROR
    assert "0.1#2:flaky_forever" in str(caught.value) and "gave up after 3 of 3 attempts" in str(caught.value)
    assert "ConnectionError: upstream down for 7" in str(caught.value)
    assert [r.state["ok"] for r in goods] == list(range(20))

    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'bad-7'") == [
        ("ERROR",)]
    (error,), = sql(database_url, "SELECT error FROM dbos.workflow_output WHERE workflow_uuid = 'bad-7'")
    stored = json.loads(error)
    assert stored["name"] == "NodeFailed" and "upstream down for 7" in stored["message"]
    assert stored["data"]["node"] == "0.1#2:flaky_forever" and stored["data"]["attempts"] == 3
    steps = sql(database_url, "SELECT function_name, output IS NULL, error FROM dbos.operation_outputs "
                              "WHERE workflow_uuid = 'bad-7' ORDER BY function_id")
    # retries=2 is a durable policy: each attempt a step row with its error, each failure a
    # recorded decision (the last one: give up).
    assert [s[0] for s in steps] == ["0.0:healthy", "0.1:flaky_forever", "0.1:retry", "0.1#1:flaky_forever",
                                     "0.1#1:retry", "0.1#2:flaky_forever", "0.1#2:retry"]
    assert all(s[1] and "upstream down for 7" in s[2] for s in steps if s[0].endswith("flaky_forever"))
    assert sql(database_url, "SELECT count(*) FROM dbos.workflow_status "
                             "WHERE workflow_uuid LIKE 'good-%' AND status = 'SUCCESS'") == [(20,)]
