"""Start options on Postgres: priority order on a queue, one run per dedup key under
concurrent starts, a delayed start across a restart, a token budget stopping a map of
agents at the right item, the cost column, and clear errors for bad options."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from dbutil import sql
from durapipe import Agent, App, BudgetExceeded, DurapipeError, fn, map_over
from durapipe.audit import install_views
from durapipe.errors import BuildError
from durapipe.models import FakeModel

ORDER: list[str] = []


def record(state: dict[str, Any]) -> dict[str, Any]:
    if state.get("block"):
        time.sleep(0.5)  # holds the queue's one slot while the others are enqueued
    ORDER.append(state["name"])
    return {"at": time.time()}


def test_priorities_lowest_first_fifo_within_a_level(make_app: Callable[..., App]) -> None:
    app = make_app("prio-app")
    app.queue("one", concurrency=1, polling_interval=0.05)
    p = app.pipeline("p", fn(record, name="record"))
    ORDER.clear()
    with app:
        first = p.enqueue({"name": "blocker", "block": True}, queue="one")
        time.sleep(0.2)  # the blocker is running: the rest wait on the queue
        plan = [("low-a", 9), ("high-a", 1), ("mid", 5), ("low-b", 9), ("high-b", 1),
                ("none", None)]
        handles = [p.enqueue({"name": n}, queue="one", priority=pr) for n, pr in plan]
        first.result(timeout=30)
        for h in handles:
            h.result(timeout=30)
    # No priority is 0: first. Then 1, 5, 9; equal priorities in enqueue order.
    assert ORDER == ["blocker", "none", "high-a", "high-b", "mid", "low-a", "low-b"]


def test_concurrent_starts_with_one_dedup_key_give_one_run(make_app: Callable[..., App]) -> None:
    app = make_app("dedup-app")
    gate = threading.Event()

    def wait(state: dict[str, Any]) -> dict[str, Any]:
        gate.wait(20)
        return {"done": True}

    p = app.pipeline("p", fn(wait, name="wait"))
    with app:
        ids: list[str] = []
        barrier = threading.Barrier(8)

        def go(i: int) -> None:
            barrier.wait()
            ids.append(p.start({"i": i}, dedup_key="order-42").run_id)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(ids)) == 1
        other = p.start({"i": 99}, dedup_key="order-43")  # another key: its own run
        assert other.run_id != ids[0]
        gate.set()
        assert app.get_run(ids[0]).result(timeout=30).state["done"]
        # Once the run is finished, the key starts a new run.
        again = p.start({"i": 7}, dedup_key="order-42")
        assert again.run_id != ids[0]
        again.result(timeout=30)
    rows = sql(app.database_url, "SELECT count(*) FROM dbos.workflow_status "
                                 "WHERE name = 'durapipe.run' AND attributes->>'durapipe.dedup' "
                                 "LIKE '%order-42'")
    assert rows == [(2,)]


def test_delayed_start_survives_a_restart(database_url: str) -> None:
    def build() -> tuple[App, Any]:
        app = App("delay-app", database_url)
        return app, app.pipeline("p", fn(record, name="record"))

    app, p = build()
    with app:
        started = time.time()
        handle = p.start({"name": "later"}, delay=1.5, tenant="acme")
        assert handle.status().value == "DELAYED"
    # The process that started it is gone; a new one runs it when the delay is up.
    app, p = build()
    with app:
        result = app.get_run(handle.run_id).result(timeout=30)
    assert result.state["at"] >= started + 1.5
    assert sql(database_url, "SELECT attributes->>'durapipe.tenant' FROM dbos.workflow_status "
                             "WHERE workflow_uuid = %s", handle.run_id) == [("acme",)]


def test_budget_stops_a_map_of_agents_at_the_item_past_it(make_app: Callable[..., App]) -> None:
    app = make_app("budget-app", model=FakeModel({"w": lambda req: "five words of output here"}),
                   prices={"fake": (1.0, 2.0)})
    agent = Agent("w").instruct("Write about {item}.").writes("text")
    p = app.pipeline("p", map_over("items", agent, "texts", concurrency=1))
    with app:
        ok = p.run({"items": ["a", "b"]})  # no budget: the app has no default
        assert len(ok.state["texts"]) == 2
        per_call = _tokens(app, ok.run_id) // 2
        handle = p.start({"items": list("abcdef")}, max_tokens=per_call * 3 + 1)
        with pytest.raises(BudgetExceeded) as info:
            handle.result(timeout=30)
    err = info.value
    assert err.used == per_call * 4 and err.max_tokens == per_call * 3 + 1
    assert "agent 0.0#4:w" in str(err)  # the fifth item (0-based #4) of the map at 0
    assert f"used {per_call * 4} tokens" in str(err)
    assert _tokens(app, handle.run_id) == per_call * 4  # four model calls made, no more
    install_views(app.database_url)
    costs = sql(app.database_url, "SELECT input_tokens, output_tokens, cost FROM "
                                  "durapipe.llm_calls WHERE run_id = %s", handle.run_id)
    assert len(costs) == 4
    assert all(float(c) == pytest.approx((i * 1.0 + o * 2.0) / 1e6) for i, o, c in costs)


def _tokens(app: App, run_id: str) -> int:
    from durapipe.engine.budget import usage

    return usage(app, run_id)


def test_bad_start_options_are_clear_errors(make_app: Callable[..., App]) -> None:
    app = make_app("bad-admit")
    app.queue("t", per_tenant=2)
    p = app.pipeline("p", fn(record, name="record"))
    with pytest.raises(BuildError, match="per_tenant=0"):
        app.queue("u", per_tenant=0)
    with pytest.raises(BuildError, match="per_tenant_rate"):
        app.queue("v", per_tenant_rate=(5, 0))
    with app:
        for kwargs, text in [({"priority": -1}, "priority=-1"), ({"delay": "soon"}, "delay='soon'"),
                             ({"tenant": ""}, "tenant=''"), ({"dedup_key": 5}, "dedup_key=5"),
                             ({"max_tokens": 0}, "max_tokens=0")]:
            with pytest.raises(DurapipeError, match=text):
                p.start({"name": "x"}, **kwargs)
        with pytest.raises(DurapipeError, match="pass tenant="):
            p.enqueue({"name": "x"}, queue="t")
        with pytest.raises(BuildError, match="not a cron expression"):
            p.schedule("every minute")
    assert sql(app.database_url, "SELECT count(*) FROM dbos.workflow_status "
                                 "WHERE name = 'durapipe.run'") == [(0,)]
