"""Flow control: durable Retry, best_of, collected failures, detached tasks, edge semantics.

Each on Postgres; the crash tests (attempts and best_of across SIGKILL) are in
``test_flow_control_crash.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner

from dbutil import sql, wait_for
from durapipe import (
    Agent,
    App,
    BuildError,
    Flow,
    ModelError,
    NodeFailed,
    Retry,
    Step,
    best_of,
    dispatch,
    fn,
    join,
    map_over,
    parallel,
    until,
)
from durapipe.audit import install_views
from durapipe.cli import cli
from durapipe.diagram import mermaid
from durapipe.models import FakeModel
from durapipe.retry import policy_of

MakeApp = Callable[..., App]


def step_rows(url: str, wf: str, like: str = "%") -> dict[str, tuple[Any, Any]]:
    """Step name -> (output, error) of workflow ``wf``."""
    rows = sql(url, "SELECT function_name, output, error FROM dbos.operation_outputs "
                    "WHERE workflow_uuid = %s AND function_name LIKE %s ORDER BY function_id", wf, like)
    return {name: (json.loads(out) if out else None, err) for name, out, err in rows}


# -- Retry ----------------------------------------------------------------------------------

def test_retry_policies_of_fn_agent_and_step(make_app: MakeApp, database_url: str) -> None:
    """A fn retried twice then fine, each failure a recorded decision; retry_on, give_up_on
    and running out of attempts; an agent and a Flow step (a sequence) with a policy."""
    calls: list[int] = []

    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError(f"down {len(calls)}")
        return {"ok": len(calls)}

    app = make_app()
    p = app.pipeline("p", fn(flaky, retry=Retry(attempts=4, backoff=0.05, jitter=0.5)))
    give_up, not_listed, exhausted, counts = _failing_pipelines(app)
    agent_flow, asked, seq_calls = _agent_and_step(app)
    with app:
        assert p.run({}, run_id="r").state["ok"] == 3
        with pytest.raises(NodeFailed, match=r"gave up after 1 of 3 attempts: its error is not retried"):
            give_up.run({})
        with pytest.raises(NodeFailed, match=r"gave up after 1 of 3"):
            not_listed.run({})
        # TimeoutError is an OSError: retry_on matches base classes.
        with pytest.raises(NodeFailed, match=r"TimeoutError: nope .*gave up after 3 of 3 attempts: out of"):
            exhausted.run({})
        state = agent_flow.run({}, run_id="a").state
    assert counts == {"ValueError": 1, "KeyError": 1, "TimeoutError": 3}
    assert state["writer"] == "fine" and state["y"] == 1 and len(asked) == 2 and len(seq_calls) == 2
    assert "0.0:retry" in step_rows(database_url, "a")
    child = sql(database_url, "SELECT workflow_uuid FROM dbos.workflow_status WHERE workflow_uuid LIKE 'a/0.1.0%'")
    assert "0.1.0.0:retry" in step_rows(database_url, child[0][0])
    rows = step_rows(database_url, "r")
    assert list(rows) == ["0:flaky", "0:retry", "0#1:flaky", "0#1:retry", "0#2:flaky"]
    assert rows["0:flaky"][1] is not None and rows["0#2:flaky"][0] == {"ok": 3}
    first = rows["0:retry"][0]
    assert first["attempt"] == 1 and first["of"] == 4 and first["retry"] is True
    assert first["error"] == "ConnectionError: down 1" and 0.025 <= first["delay"] <= 0.075
    assert rows["0#1:retry"][0]["attempt"] == 2
    install_views(database_url)  # the audit lists each retry under its node
    assert sql(database_url, "SELECT node_path, kind FROM durapipe.steps WHERE run_id = 'r' AND "
                             "node_name = 'retry' ORDER BY step_id") == [("0", "step"), ("0#1", "step")]


def _failing_pipelines(app: App) -> tuple[Any, Any, Any, dict[str, int]]:
    counts: dict[str, int] = {}

    def failing(kind: type[Exception]) -> Any:
        def f(state: dict[str, Any]) -> dict[str, Any]:
            counts[kind.__name__] = counts.get(kind.__name__, 0) + 1
            raise kind("nope")
        f.__name__ = f"raise_{kind.__name__}"
        return f

    policy: dict[str, Any] = dict(attempts=3, backoff=0.01, jitter=0)
    give_up = app.pipeline("give_up", fn(failing(ValueError),
                                         retry=Retry(**policy, give_up_on=[ValueError])))
    not_listed = app.pipeline("not_listed", fn(failing(KeyError), retry=Retry(**policy, retry_on=TimeoutError)))
    exhausted = app.pipeline("exhausted", fn(failing(TimeoutError), retry=Retry(**policy, retry_on=OSError)))
    return give_up, not_listed, exhausted, counts


def _agent_and_step(app: App) -> tuple[Any, list[str], list[int]]:
    asked: list[str] = []

    def answer(request: Any) -> str:
        asked.append("x")
        if len(asked) == 1:
            raise RuntimeError("provider hiccup")
        return "fine"

    seq_calls: list[int] = []

    def part(state: dict[str, Any]) -> dict[str, Any]:
        seq_calls.append(1)
        if len(seq_calls) == 1:
            raise ConnectionError("once")
        return {"y": 1}

    agent = Agent("writer", model=FakeModel(answer)).instruct("go").retry(Retry(attempts=2, backoff=0))
    flow = Flow(goals=["y"], steps=[Step("s", fn(lambda s: {}, name="noop") >> fn(part), outputs=["y"],
                                         retry=Retry(attempts=2, backoff=0))])
    return app.pipeline("agent_flow", agent >> flow), asked, seq_calls


def test_retries_n_is_the_short_form_of_a_durable_retry(make_app: MakeApp, database_url: str) -> None:
    """fn(retries=n), Agent.retries(n) and Step(retries=n) are Retry(attempts=n + 1,
    backoff=0.5): each attempt and each decision recorded, as with an explicit Retry."""
    short = Retry(attempts=3, backoff=0.5)
    assert policy_of(fn(len, retries=2)) == short == policy_of(Agent("a").retries(2))
    assert policy_of(Step("s", fn(len), outputs=["x"], retries=2).node) == short
    assert policy_of(Agent("a").retries(2).retry(Retry(attempts=5))) == Retry(attempts=5)
    assert policy_of(fn(len)) is None and policy_of(fn(len, retries=0)) is None
    with pytest.raises(BuildError, match="give retries=1 or retry=.*not both"):
        fn(len, retries=1, retry=Retry())
    # A count means durable attempts now, so a node with one has a new shape (a run recorded
    # under in-step retries waits for a worker with its own shape); a count of 0 does not.
    counted = fn(len, name="x", retries=2)
    as_before = {k: v for k, v in counted.shape().items() if k != "retry_count_means"}
    assert counted.shape()["max_retries"] == 2 and counted.shape() != as_before
    assert fn(len, name="x", retries=0).digest() == fn(len, name="x").digest()
    assert Agent("a").retries(1).digest() != Agent("a").digest() == Agent("a").retries(0).digest()

    calls: list[str] = []

    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        calls.append("fn")
        if calls.count("fn") < 3:
            raise ConnectionError(f"try {calls.count('fn')}")
        return {"ok": True}

    def answer(request: Any) -> str:
        calls.append("model")
        if calls.count("model") == 1:
            raise RuntimeError("provider hiccup")
        return "fine"

    app = make_app()
    p = app.pipeline("p", fn(flaky, retries=2) >> Agent("w", model=FakeModel(answer)).instruct("go").retries(1))
    with app:
        state = p.run({}, run_id="short").state
    assert state == {"ok": True, "w": "fine"} and calls == ["fn", "fn", "fn", "model", "model"]
    rows = step_rows(database_url, "short")
    assert list(rows) == ["0.0:flaky", "0.0:retry", "0.0#1:flaky", "0.0#1:retry", "0.0#2:flaky",
                          "0.1:w", "0.1:retry", "0.1#1:w"]
    assert rows["0.0:retry"][0]["of"] == 3 and rows["0.1:retry"][0]["of"] == 2
    assert 0.45 <= rows["0.0:retry"][0]["delay"] <= 0.55  # backoff 0.5 s, +/- 10 % jitter


def test_a_models_refusal_is_not_retried_and_its_429_is(make_app: MakeApp) -> None:
    asked: list[str] = []

    def answer(request: Any) -> str:
        asked.append(request.agent)
        if request.agent == "refused":
            raise ModelError("HTTP 400 INVALID_ARGUMENT", status_code=400)
        if asked.count("busy") == 1:
            raise ModelError("HTTP 429 RESOURCE_EXHAUSTED", status_code=429)
        return "ok"

    app = make_app()
    busy = app.pipeline("busy", Agent("busy", model=FakeModel(answer)).instruct("go").retries(1))
    refused = app.pipeline("refused", Agent("refused", model=FakeModel(answer)).instruct("go").retries(3))
    with app:
        assert busy.run({}).state["busy"] == "ok"
        with pytest.raises(ModelError, match="HTTP 400.*gave up after 1 of 4 attempts: its error is not retried"):
            refused.run({})
    assert asked.count("busy") == 2 and asked.count("refused") == 1


def test_bad_arguments_hashes_and_diagram() -> None:
    """Bad Retry arguments are BuildErrors; a new option at its default keeps a pipeline's
    hash; the diagram shows retries, best_of, collected failures and detached tasks."""
    chart = mermaid(best_of(3, fn(len, retry=Retry(attempts=2)), score=len)
                    >> map_over("xs", fn(len), "ys", errors="collect")
                    >> parallel(fn(len, name="a"), fn(len, name="b"), errors="collect")
                    >> dispatch(fn(len, name="bg"), detach=True))
    for text in ("best of 3 by len", "len · retry ×2", "failures → ys_errors",
                 "failures → errors", "dispatch: bg (detached)"):
        assert text in chart, text
    for kwargs, words in [({"attempts": 0}, "attempts must be an int >= 1"),
                          ({"jitter": 2}, "jitter must be >= 0 and <= 1"),
                          ({"retry_on": [3]}, "give exception classes")]:
        with pytest.raises(BuildError, match=words):
            Retry(**kwargs)
    with pytest.raises(BuildError, match="retry= takes Retry"):
        fn(lambda s: {}, retry=3)  # type: ignore[arg-type]
    # An option left at its default does not change a pipeline's hash.
    assert fn(len, name="x").digest() == fn(len, name="x", retry=None).digest()
    assert fn(len, name="x").digest() != fn(len, name="x", retry=Retry()).digest()


# -- collected failures ---------------------------------------------------------------------

def test_collected_failures_and_best_of(make_app: MakeApp, database_url: str) -> None:
    """A map of 20 with 5 failing and a parallel with a failing branch keep going and list
    the failures; best_of keeps the highest score and records every candidate."""
    def boom(state: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("branch broke")

    def draft(state: dict[str, Any]) -> dict[str, Any]:
        i = state["candidate"]
        if i == 3:
            raise RuntimeError("candidate 3 broke")
        return {"title": "x" * [3, 9, 5, 0][i]}

    def square(state: dict[str, Any]) -> dict[str, Any]:
        if state["item"] % 4 == 1:
            raise ValueError(f"bad item {state['item']}")
        return {"sq": state["item"] ** 2}

    app = make_app()
    collect = app.pipeline("collect", map_over("xs", fn(square, writes=["sq"]), "sqs", concurrency=6,
                                               errors="collect")
                           >> fn(lambda s: {"n_failed": len(s["sqs_errors"])}, name="count",
                                 reads=["sqs_errors"]))
    fail_fast = app.pipeline("fast", map_over("xs", fn(square), "sqs"))
    par = app.pipeline("par", parallel(fn(lambda s: {"a": 1}, name="a"), fn(boom),
                                       fn(lambda s: {"c": 3}, name="c"), errors="collect"))
    best = app.pipeline("best", best_of(4, fn(draft), score=lambda s: len(s["title"])))
    with app:
        state = collect.run({"xs": list(range(20))}).state
        pstate = par.run({}).state
        bstate = best.run({}, run_id="b").state
        with pytest.raises(NodeFailed, match=r"item \d+ failed: .*ValueError"):
            fail_fast.run({"xs": list(range(20))})
    bad = [i for i in range(20) if i % 4 == 1]
    assert state["sqs"] == [None if i in bad else i * i for i in range(20)]
    assert state["n_failed"] == 5
    assert [e["index"] for e in state["sqs_errors"]] == bad
    first = state["sqs_errors"][0]
    assert first == {"index": 1, "item": 1, "node": "0.0.0#1:square",
                     "error": first["error"], "type": "ValueError"}
    assert "bad item 1" in first["error"]
    assert pstate["a"] == 1 and pstate["c"] == 3
    assert pstate["errors"] == [{"branch": 1, "node": "0.1:boom", "type": "RuntimeError",
                                 "error": pstate["errors"][0]["error"]}]
    with pytest.raises(BuildError, match="errors must be 'raise'"):
        parallel(fn(boom), fn(boom), errors="ignore")
    assert bstate == {"title": "x" * 9}
    record = step_rows(database_url, "b")["0:best_of(draft)"][0]
    assert record["winner"] == 1
    assert [c.get("score") for c in record["candidates"]] == [3.0, 9.0, 5.0, None]
    assert "candidate 3 broke" in record["candidates"][3]["error"]


# -- detached and cancelled tasks -----------------------------------------------------------

def test_detached_task_outlives_the_run_and_tasks_cancel_by_name(make_app: MakeApp,
                                                                  database_url: str) -> None:
    """A detached heartbeat keeps running after its run succeeded, is listed as detached and
    stops when cancelled by name; a joined task cancelled by name (`durapipe cancel --task`)
    drops its writes and the join goes on."""
    stop, release = threading.Event(), threading.Event()
    ticks: list[int] = []

    async def heartbeat(state: dict[str, Any]) -> dict[str, Any]:
        while not stop.is_set():
            ticks.append(1)
            await asyncio.sleep(0.02)
        return {}

    def slow(state: dict[str, Any]) -> dict[str, Any]:
        release.wait(30)
        return {"slow": True}

    def status(wf: str) -> list[tuple[Any, ...]]:
        return sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", wf)

    app = make_app()
    p = app.pipeline("p", dispatch(fn(heartbeat), names=["beat"], detach=True)
                     >> fn(lambda s: {"done": True}, name="main"))
    q = app.pipeline("q", dispatch(fn(slow), fn(lambda s: {"quick": 1}, name="quick"))
                     >> join() >> fn(lambda s: {"saw": sorted(k for k in s if k in ("slow", "quick"))},
                                     name="after"))
    with pytest.raises(BuildError, match="detach=True, so it is never joined"):
        app.pipeline("bad", dispatch(fn(heartbeat), names=["beat"], detach=True) >> join("beat"))
    with app:
        assert p.run({}, run_id="r").state["done"] is True
        wait_for(lambda: len(ticks) > 2, what="the detached task to run")
        assert status("r/0.0.0:beat") == [("PENDING",)]
        install_views(database_url)
        assert sql(database_url, "SELECT task, status, child_status FROM durapipe.background_tasks "
                                 "WHERE run_id = 'r'") == [("beat", "detached", "PENDING")]
        assert status("r") == [("SUCCESS",)]  # the run ended; its detached task runs on
        app.get_run("r").cancel_task("beat")
        wait_for(lambda: status("r/0.0.0:beat") == [("CANCELLED",)], what="the cancel")
        # The same by name from the CLI, on another run's detached task.
        assert p.run({}, run_id="r2").state["done"] is True
        wait_for(lambda: status("r2/0.0.0:beat") == [("PENDING",)], what="the second detached task")
        res = CliRunner().invoke(cli, ["cancel", "r2", "--task", "beat", "--database-url", database_url],
                                 catch_exceptions=False)
        assert res.exit_code == 0 and "cancelled task beat of run r2" in res.output, res.output
        wait_for(lambda: status("r2/0.0.0:beat") == [("CANCELLED",)], what="the CLI's cancel")
        assert status("r2") == [("SUCCESS",)]
        assert sql(database_url, "SELECT task, status, child_status FROM durapipe.background_tasks "
                                 "WHERE run_id = 'r2'") == [("beat", "detached", "CANCELLED")]
        stop.set()

        handle = q.start({}, run_id="s")
        wait_for(lambda: status("s/0.0.0:slow") != [], what="the task to start")
        res = CliRunner().invoke(cli, ["cancel", "s", "--task", "slow", "--database-url", database_url],
                                 catch_exceptions=False)
        assert res.exit_code == 0 and "cancelled task slow of run s (s/0.0.0:slow)" in res.output
        state = handle.result(timeout=30).state
        release.set()
    assert state["saw"] == ["quick"]
    assert dict(sql(database_url, "SELECT task, status FROM durapipe.background_tasks WHERE run_id = 's'")) == {
        "slow": "cancelled", "quick": "joined"}


# -- edge semantics -------------------------------------------------------------------------

def test_edge_semantics(make_app: MakeApp, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def bad_callback(name: str, result: Any) -> None:
        seen.append(name)
        raise RuntimeError("monitoring broke")

    app = make_app()
    loop = app.pipeline("loop", fn(lambda s: {"n": s["n"] + 1}, name="inc") * until(lambda s: s["n"] > 99, max=3))
    cb = app.pipeline("cb", dispatch(fn(lambda s: {"t": 1}, name="task"), on_complete=bad_callback)
                      >> join())
    with app:
        assert loop.run({"n": 0}, run_id="l").state["n"] == 3
        assert cb.run({}, run_id="c").state["t"] == 1
    assert step_rows(database_url, "l", "0:loop")["0:loop"][0] == {
        "max_reached": True, "passes": 3, "until": step_rows(database_url, "l", "0:loop")["0:loop"][0]["until"]}
    assert seen == ["task"]
    out, err = step_rows(database_url, "c/0.0.0:task")["0.0.0:on_complete"]
    assert err is None and out["callback_error"] == "RuntimeError: monitoring broke"
    assert any("monitoring broke" in r.getMessage() for r in caplog.records)  # and logged
    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'c/0.0.0:task'") \
        == [("SUCCESS",)]  # the task's outcome stands
    assert any("max" in r.getMessage() and "0:" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")  # the loop at its max warned too
    with pytest.raises(BuildError, match="nothing to join here"):
        app.pipeline("j", fn(lambda s: {}, name="x") >> join())
    flow = Flow(goals=["y"], steps=[Step("s", lambda s: {"y": 1}, outputs=["y"])])
    with pytest.raises(BuildError, match="cannot repeat"):
        app.pipeline("f", flow * 3)
