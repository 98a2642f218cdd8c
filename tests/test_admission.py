"""Start options on Postgres: priority order on a queue, one run per dedup key under
concurrent starts, a per-tenant rate, a token budget
stopping a map of agents at the right item, the cost column, the tenant in the CLI, views
and console, schedules listed and paused from the CLI, and clear errors for bad options.

One app (one database, one launch) serves them all, to keep the suite short.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dbutil import most_at_once, scratch_database, sql
from durapipe import Agent, App, BudgetExceeded, DurapipeError, Pipeline, dispatch, fn, join, map_over
from durapipe.audit import install_views
from durapipe.cli import cli
from durapipe.engine.budget import usage
from durapipe.errors import BuildError
from durapipe.models import FakeModel
from durapipe.web import create_console

ORDER: list[str] = []
GATE = threading.Event()
BLOCK = threading.Event()


def record(state: dict[str, Any]) -> dict[str, Any]:
    if state.get("block"):
        BLOCK.wait(20)  # holds the queue's one slot until the others are enqueued
    ORDER.append(state["name"])
    return {"at": time.time()}


SPANS: list[tuple[float, float]] = []


def task_work(state: dict[str, Any]) -> dict[str, Any]:
    start = time.time()
    time.sleep(0.2)
    SPANS.append((start, time.time()))
    return {}


def wait(state: dict[str, Any]) -> dict[str, Any]:
    GATE.wait(20)
    return {"done": True}


class Shared:
    def __init__(self, url: str) -> None:
        self.url = url
        self.app = App("admit-app", url, model=FakeModel({"w": lambda req: "five words of output"}),
                       prices={"fake": (1.0, 2.0)})
        self.app.queue("one", concurrency=1, polling_interval=0.05)
        self.app.queue("rate", per_tenant_rate=(2, 1.0), polling_interval=0.05)
        self.app.queue("t", per_tenant=2)
        self.app.queue("runs", per_tenant=2, polling_interval=0.05)
        self.record = self.app.pipeline("record", fn(record, name="record"))
        self.wait = self.app.pipeline("wait", fn(wait, name="wait"))
        agent = Agent("w").instruct("Write about {item}.").writes("text")
        self.agents = self.app.pipeline("agents", map_over("items", agent, "texts", concurrency=1))
        self.tasks = self.app.pipeline("tasks", dispatch(
            *[fn(task_work, name=f"job{i}") for i in range(4)], names=[f"job{i}" for i in range(4)],
            queue="t") >> join())
        self.task_agents = self.app.pipeline("task-agents", dispatch(
            Agent("w").instruct("Write about {a}.").writes("ta"),
            Agent("w").instruct("Write about {b}.").writes("tb"), names=["a", "b"], max_tasks=1)
            >> join() >> Agent("w").instruct("Sum up {ta} {tb}.").writes("text"))
        self.record.schedule("0 0 1 1 *", {"name": "new year"}, name="yearly")


@pytest.fixture(scope="module")
def shared(pg_server_url: str) -> Iterator[Shared]:
    with scratch_database(pg_server_url) as url:
        s = Shared(url)
        with s.app:
            install_views(url)
            yield s


def test_priorities_lowest_first_fifo_within_a_level(shared: Shared) -> None:
    ORDER.clear()
    BLOCK.clear()
    # The blocker runs first (priority 0, enqueued first) and holds the queue's one slot
    # until all the others wait on the queue.
    first = shared.record.enqueue({"name": "blocker", "block": True}, queue="one")
    plan = [("low-a", 9), ("high-a", 1), ("mid", 5), ("low-b", 9), ("high-b", 1), ("none", None)]
    handles = [shared.record.enqueue({"name": n}, queue="one", priority=pr) for n, pr in plan]
    BLOCK.set()
    first.result(timeout=30)
    for h in handles:
        h.result(timeout=30)
    # No priority is 0: first. Then 1, 5, 9; equal priorities in enqueue order.
    assert ORDER == ["blocker", "none", "high-a", "high-b", "mid", "low-a", "low-b"]


def test_per_tenant_rate_limits_each_tenant_alone(shared: Shared) -> None:
    handles = [shared.record.enqueue({"name": f"{t}{i}"}, queue="rate", tenant=t)
               for i in range(3) for t in ("x", "y")]
    for h in handles:
        h.result(timeout=30)
    # When DBOS started each run (the clock its rate limit counts with).
    rows = sql(shared.url, "SELECT attributes->>'durapipe.tenant', started_at_epoch_ms / 1000.0 "
                           "FROM dbos.workflow_status WHERE workflow_uuid = ANY(%s)",
               [h.run_id for h in handles])
    starts = {t: sorted(float(at) for tenant, at in rows if tenant == t) for t in "xy"}
    for t in "xy":  # two starts per second per tenant: the third waits for the window
        assert len(starts[t]) == 3 and starts[t][2] - starts[t][0] >= 0.99, (t, starts[t])
    # The tenants do not share the limit: both first pairs started within one window (four
    # starts in less than a second, which a limit of two per second for both would refuse).
    firsts = starts["x"][:2] + starts["y"][:2]
    assert max(firsts) - min(firsts) < 1.0, starts


def test_background_tasks_count_against_their_runs_tenant(shared: Shared) -> None:
    SPANS.clear()
    # Two runs of one tenant at once (a runs queue with per_tenant=2), four tasks each on
    # queue t (per_tenant=2): the tenant's limit holds across both runs' tasks.
    runs = [shared.tasks.enqueue({}, queue="runs", tenant="acme") for _ in range(2)]
    for h in runs:
        h.result(timeout=30)
    assert len(SPANS) == 8
    assert most_at_once(SPANS) == 2  # at the limit, never past it
    runs_at = sql(shared.url, "SELECT started_at_epoch_ms, updated_at FROM dbos.workflow_status "
                              "WHERE workflow_uuid = ANY(%s)", [h.run_id for h in runs])
    assert most_at_once(runs_at) == 2  # both runs were in flight while the tasks waited
    assert sql(shared.url, "SELECT DISTINCT queue_partition_key FROM dbos.workflow_status "
                           "WHERE parent_workflow_id = ANY(%s)", [h.run_id for h in runs]) == [("acme",)]
    # Enqueued on the queue its tasks go to, a run would wait for slots its tenant's runs hold.
    with pytest.raises(DurapipeError, match="dispatch 0.0 puts its tasks on queue 't'"):
        shared.tasks.enqueue({}, queue="t", tenant="acme")


def test_concurrent_starts_with_one_dedup_key_give_one_run(shared: Shared) -> None:
    GATE.clear()
    ids: list[str] = []
    # More starts at once than DBOS's pool has connections (20): the ones waiting for the
    # key must not hold the connections the first one needs to start the run.
    barrier = threading.Barrier(40)

    def go(i: int) -> None:
        barrier.wait()
        ids.append(shared.wait.start({"i": i}, dedup_key="order-42").run_id)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 40 and len(set(ids)) == 1

    async def starts() -> set[str]:
        handles = await asyncio.gather(*(shared.wait.start_async({"i": i}, dedup_key="order-42")
                                         for i in range(40)))
        return {h.run_id for h in handles}

    assert asyncio.run(starts()) == {ids[0]}
    other = shared.wait.start({"i": 99}, dedup_key="order-43")  # another key: its own run
    assert other.run_id != ids[0]
    GATE.set()
    assert shared.app.get_run(ids[0]).result(timeout=30).state["done"]
    # Once that run is finished, the key starts a new one.
    again = shared.wait.start({"i": 7}, dedup_key="order-42")
    assert again.run_id != ids[0]
    again.result(timeout=30)
    assert sql(shared.url, "SELECT count(*) FROM dbos.workflow_status WHERE name LIKE 'durapipe.run:%' "
                           "AND attributes->>'durapipe.dedup' LIKE '%order-42'") == [(2,)]


def test_budget_stops_a_map_of_agents_at_the_item_past_it(shared: Shared) -> None:
    ok = shared.agents.run({"items": ["a", "b"]})  # no budget: the app has no default
    per_call = usage(shared.app, ok.run_id) // 2
    handle = shared.agents.start({"items": list("abcdef")}, max_tokens=per_call * 3 + 1)
    with pytest.raises(BudgetExceeded) as info:
        handle.result(timeout=30)
    err = info.value
    assert err.used == per_call * 4 and err.max_tokens == per_call * 3 + 1
    assert "agent 0.0#4:w" in str(err)  # the fifth item (0-based #4) of the map at 0
    assert f"used {per_call * 4} tokens" in str(err)
    assert usage(shared.app, handle.run_id) == per_call * 4  # four model calls made, no more
    shared.app.max_tokens = per_call + 1  # the app's default budget, for runs without one
    try:
        with pytest.raises(BudgetExceeded, match=r"agent 0\.0#2:w"):
            shared.agents.run({"items": list("abc")})
    finally:
        shared.app.max_tokens = None
    # Background tasks count: a task past the budget fails the run with BudgetExceeded, and
    # the call after the join counts the tasks' tokens.
    ab = {"a": "x", "b": "y"}
    with pytest.raises(BudgetExceeded, match=r"background task 'b' .* agent 0\.0\.1:w") as info:
        shared.task_agents.run(ab, max_tokens=1)
    assert info.value.node == "0.0.1:w" and info.value.used > 0
    rid = shared.task_agents.run(ab).run_id
    tasks_used = sum(usage(shared.app, f"{rid}/0.0.{i}:{t}") for i, t in enumerate("ab"))
    assert 0 < tasks_used < usage(shared.app, rid)
    with pytest.raises(BudgetExceeded, match=rf"agent 0\.2:w: .* used {tasks_used} tokens"):
        shared.task_agents.run(ab, max_tokens=tasks_used)
    costs = sql(shared.url, "SELECT input_tokens, output_tokens, cost FROM durapipe.llm_calls "
                            "WHERE run_id = %s", handle.run_id)
    assert len(costs) == 4
    assert all(float(c) == pytest.approx((i * 1.0 + o * 2.0) / 1e6) for i, o, c in costs)


def test_tenant_in_the_cli_views_and_console(shared: Shared) -> None:
    for t in ("initech", "initech", "globex"):
        shared.record.run({"name": t}, tenant=t)
    url = shared.url
    res = CliRunner().invoke(cli, ["runs", "--tenant", "initech", "--json", "--database-url", url])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.output)
    assert len(listed) == 2 and {r["tenant"] for r in listed} == {"initech"}
    assert sql(url, "SELECT tenant, count(*) FROM durapipe.runs WHERE tenant IN ('initech', 'globex') "
                    "GROUP BY tenant ORDER BY tenant") == [("globex", 1), ("initech", 2)]
    with TestClient(create_console(shared.app)) as client:
        page = client.get("/", params={"tenant": "globex"}).text
    assert page.count('href="/runs/') == 1 and "globex" in page


def test_schedules_listed_paused_and_resumed_from_the_cli(shared: Shared) -> None:
    url, runner = shared.url, CliRunner()

    def listed() -> list[dict[str, Any]]:
        res = runner.invoke(cli, ["schedules", "--json", "--database-url", url])
        assert res.exit_code == 0, res.output
        return list(json.loads(res.output))

    [row] = listed()
    assert (row["app"], row["name"], row["pipeline"], row["cron"], row["status"]) == (
        "admit-app", "yearly", "record", "0 0 1 1 *", "ACTIVE")
    res = runner.invoke(cli, ["schedules", "pause", "yearly", "--database-url", url])
    assert res.exit_code == 0 and "paused" in res.output, res.output
    assert listed()[0]["status"] == "PAUSED"
    # Declaring it again with the same definition (as a restarted worker does) keeps it paused.
    shared.record.schedule("0 0 1 1 *", {"name": "new year"}, name="yearly")
    assert listed()[0]["status"] == "PAUSED"
    res = runner.invoke(cli, ["schedules", "resume", "admit-app:yearly", "--database-url", url])
    assert res.exit_code == 0 and listed()[0]["status"] == "ACTIVE"
    res = runner.invoke(cli, ["schedules", "pause", "nope", "--database-url", url])
    assert res.exit_code != 0 and "schedule 'nope' does not exist" in res.output


def test_bad_start_options_are_clear_errors(shared: Shared) -> None:
    app, p = shared.app, shared.record
    with pytest.raises(BuildError, match="per_tenant=0"):
        App("x-app").queue("u", per_tenant=0)
    with pytest.raises(BuildError, match="per_tenant_rate"):
        App("x-app").queue("v", per_tenant_rate=(5, 0))
    before = sql(shared.url, "SELECT count(*) FROM dbos.workflow_status")
    for kwargs, text in [({"priority": -1}, "priority=-1"), ({"delay": "soon"}, "delay='soon'"),
                         ({"tenant": ""}, "tenant=''"), ({"dedup_key": 5}, "dedup_key=5"),
                         ({"max_tokens": 0}, "max_tokens=0")]:
        with pytest.raises(DurapipeError, match=text):
            p.start({"name": "x"}, **kwargs)
    with pytest.raises(DurapipeError, match="pass tenant="):
        p.enqueue({"name": "x"}, queue="t")
    with pytest.raises(DurapipeError, match=r"has no queue 'nope' \(declared: .*app.queue\('nope'\)"):
        p.enqueue({"name": "x"}, queue="nope", tenant="acme")
    with pytest.raises(DurapipeError, match="max_tokens=-5 must be a positive int"):
        p.enqueue({"name": "x"}, queue="one", max_tokens=-5)
    with pytest.raises(BuildError, match="not a cron expression"):
        p.schedule("every minute")
    assert sql(shared.url, "SELECT count(*) FROM dbos.workflow_status") == before
    assert isinstance(p, Pipeline) and app.max_tokens is None
