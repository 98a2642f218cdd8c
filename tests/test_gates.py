"""Human approval gates: announce, wait, approve/reject, approvers, timeouts, idempotency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from dbutil import sql, wait_for
from durapipe import App, BuildError, GateRejected, NodeTimeout, PendingGate, RunStatus, fn, gate, race
from durapipe.engine import RunHandle
from durapipe.errors import ApprovalRefused, UnknownGate, UnknownRun

S = dict[str, Any]


def waiting_at(app: App, run_id: str, name: str) -> Callable[[], bool]:
    return lambda: any(g.gate == name for g in app.pending(run_id))


def event(url: str, run_id: str, key: str) -> Any:
    import json

    rows = sql(url, "SELECT value FROM dbos.workflow_events WHERE workflow_uuid = %s AND key = %s",
               run_id, key)
    return json.loads(rows[0][0]) if rows else None


def make(app: App, **gate_kwargs: Any) -> Any:
    kwargs = {"message": "Publish {title}?", **gate_kwargs}
    return app.pipeline("p", fn(lambda s: {"title": s["topic"].upper()}, name="draft", writes=["title"])
                        >> gate("legal", **kwargs)
                        >> fn(lambda s: {"published": True}, name="publish"))


def test_approve_continues_the_run_and_records_who_and_when(
    make_app: Callable[..., App], database_url: str
) -> None:
    app = make_app()
    p = make(app, approvers=["alice", "bob"])
    with app:
        h = p.start({"topic": "ai"}, run_id="post-1")
        wait_for(waiting_at(app, "post-1", "legal"), what="gate announced")
        [pg] = app.pending("post-1")
        assert pg == PendingGate("post-1", "legal", "Publish AI?", ["alice", "bob"], pg.requested_at)
        assert app.pending() == [pg]
        waiting = event(database_url, "post-1", "gate:legal")
        assert waiting == {"gate": "legal", "status": "waiting", "message": "Publish AI?",
                           "approvers": ["alice", "bob"], "requested_at": pg.requested_at}
        before = int(time.time() * 1000)
        app.approve("post-1", "legal", by="alice", comment="ok")
        state = h.result(timeout=30).state
        assert app.pending("post-1") == []
    decision = state["legal"]
    assert state["published"] is True
    assert decision["approved"] is True and decision["by"] == "alice" and decision["comment"] == "ok"
    assert before <= decision["at"] <= int(time.time() * 1000)
    final = event(database_url, "post-1", "gate:legal")
    assert final == {"gate": "legal", "status": "approved", "by": "alice", "comment": "ok",
                     "decided_at": decision["at"], "message": "Publish AI?",
                     "approvers": ["alice", "bob"], "requested_at": pg.requested_at}


def test_reject_raises_gate_rejected_unless_handled(make_app: Callable[..., App], database_url: str) -> None:
    app = make_app()
    p = make(app)
    handled = app.pipeline("handled", gate("legal", "ok?") // fn(lambda s: {"plan_b": True}, name="b"))
    with app:
        h = p.start({"topic": "x"}, run_id="rej-1")
        wait_for(waiting_at(app, "rej-1", "legal"))
        app.reject("rej-1", "legal", by="carol", comment="too risky")
        with pytest.raises(GateRejected, match="rejected by 'carol': too risky") as e:
            h.result(timeout=30)
        assert e.value.by == "carol" and h.status() is RunStatus.ERROR
        h2 = handled.start({}, run_id="rej-2")
        wait_for(waiting_at(app, "rej-2", "legal"))
        app.reject("rej-2", "legal", by="carol")
        assert h2.result(timeout=30).state == {"plan_b": True}
    assert event(database_url, "rej-1", "gate:legal")["status"] == "rejected"


def test_wrong_answers_are_refused_and_change_nothing(make_app: Callable[..., App]) -> None:
    app = make_app()
    p = make(app, approvers=["alice"])
    other = app.pipeline("other", fn(lambda s: None, name="noop"))
    with app:
        h = p.start({"topic": "x"}, run_id="ref-1")
        wait_for(waiting_at(app, "ref-1", "legal"))
        with pytest.raises(ApprovalRefused, match=r"'mallory' may not answer gate 'legal'.*\['alice'\]"):
            app.approve("ref-1", "legal", by="mallory")
        with pytest.raises(UnknownGate, match=r"not waiting at gate 'finance': it is waiting at \['legal'\]"):
            app.approve("ref-1", "finance", by="alice")
        with pytest.raises(UnknownRun):
            app.approve("nope", "legal", by="alice")
        other.run({}, run_id="done-1")
        with pytest.raises(UnknownGate, match="not waiting at any gate"):
            app.reject("done-1", "legal", by="alice")
        assert [g.gate for g in app.pending("ref-1")] == ["legal"]
        assert h.status() is RunStatus.PENDING
        app.approve("ref-1", "legal", by="alice")
        assert h.result(timeout=30).state["legal"]["by"] == "alice"


def test_an_answer_sent_twice_applies_once(make_app: Callable[..., App], database_url: str) -> None:
    app = make_app()
    # Two passes through one gate name: a stale second answer must not approve the second pass.
    p = app.pipeline("p", (gate("ok", "pass?") >> fn(lambda s: {"n": s["n"] + 1}, name="inc")) * 2)
    with app:
        h = p.start({"n": 0}, run_id="twice-1")
        wait_for(waiting_at(app, "twice-1", "ok"))
        [first] = app.pending("twice-1")
        app.approve("twice-1", "ok", by="alice")
        # the same answer again, as a retrying client would send it
        from dbos import DBOS

        from durapipe.engine import gates as g
        msg = {"decision": "approved", "by": "alice", "comment": None, "at": 1,
               "requested_at": first.requested_at}
        DBOS.send("twice-1", msg, topic="gate:ok",
                  idempotency_key=f"durapipe:twice-1:gate:ok:{first.requested_at}")
        wait_for(lambda: any(pg.requested_at != first.requested_at for pg in app.pending("twice-1")),
                 what="second pass waiting")
        assert h.status() is RunStatus.PENDING
        # a stale answer to the first request (different key) is not taken for the second one
        DBOS.send("twice-1", {**msg, "by": "stale"}, topic="gate:ok")
        time.sleep(0.3)
        assert h.status() is RunStatus.PENDING
        app.approve("twice-1", "ok", by="bob")
        state = h.result(timeout=30).state
        assert state["n"] == 2 and state["ok"]["by"] == "bob"
        assert g.event_key("ok") == "gate:ok"
    rows = sql(database_url, "SELECT count(*) FROM dbos.notifications WHERE destination_uuid = 'twice-1'")
    assert rows[0][0] == 3


@pytest.mark.parametrize("policy", ["reject", "approve", "fail"])
def test_timeout_follows_on_timeout(make_app: Callable[..., App], database_url: str, policy: str) -> None:
    app = make_app()
    p = app.pipeline("p", gate("g", "hurry", timeout=0.3, on_timeout=policy))
    with app:
        h = p.start({}, run_id=f"to-{policy}")
        if policy == "approve":
            decision = h.result(timeout=30).state["g"]
            assert decision["approved"] is True and decision["by"] is None
        else:
            with pytest.raises(GateRejected if policy == "reject" else NodeTimeout, match="within 0.3 s"):
                h.result(timeout=30)
    ev = event(database_url, f"to-{policy}", "gate:g")
    assert ev["status"] == "timed_out" and ev["decided_at"] == ev["requested_at"] + 300


def test_when_skips_and_async_twins_and_gate_in_a_child(make_app: Callable[..., App]) -> None:
    app = make_app()
    p = app.pipeline("p", gate("big", "amount {amount}", when=lambda s: s["amount"] > 100)
                     >> fn(lambda s: {"paid": True}, name="pay"))
    # A gate inside a race branch waits in a child workflow; callers still use the run id.
    q = app.pipeline("q", race(gate("human", "ok?"), gate("other", "ok?")))

    async def main() -> None:
        async with app:
            assert (await p.run_async({"amount": 5})).state == {"amount": 5, "paid": True}
            h = await p.start_async({"amount": 500}, run_id="async-1")
            while not await app.pending_async("async-1"):
                await asyncio.sleep(0.02)
            await app.approve_async("async-1", "big", by="ann")
            assert (await h.result_async(timeout=30)).state["big"]["by"] == "ann"
            h2: RunHandle = await q.start_async({}, run_id="child-1")
            while len(await app.pending_async("child-1")) < 2:
                await asyncio.sleep(0.02)
            assert {g.run_id for g in await app.pending_async("child-1")} == {"child-1"}
            await app.reject_async("child-1", "human", by="ann")
            await app.approve_async("child-1", "other", by="ann")
            assert (await h2.result_async(timeout=30)).state["other"]["approved"] is True

    asyncio.run(main())


def test_gate_arguments_are_checked() -> None:
    with pytest.raises(BuildError, match="non-empty string"):
        gate("", "m")
    with pytest.raises(BuildError, match="on_timeout must be"):
        gate("g", "m", on_timeout="maybe")
    with pytest.raises(BuildError, match="nobody"):
        gate("g", "m", approvers=[])
    with pytest.raises(BuildError, match="seconds > 0"):
        gate("g", "m", timeout=-1)
    with pytest.raises(BuildError, match="placeholders"):
        gate("g", "m {}")
    assert gate("g", "m", approvers="alice").approvers == ("alice",)


def test_gate_inside_a_dispatched_task(make_app: Callable[..., App], database_url: str) -> None:
    from durapipe import dispatch, join

    app = make_app()
    task = gate("legal", "Approve {title}?") >> fn(lambda s: {"shipped": True}, name="ship")
    p = app.pipeline("p", dispatch(task, names=["review"]) >> join() >> fn(lambda s: {"done": s["shipped"]}, name="end"))
    with app:
        handle = p.start({"title": "T"}, run_id="task-gate")
        wait_for(lambda: [g.gate for g in app.pending("task-gate")] == ["legal"], what="the task's gate")
        app.approve("task-gate", "legal", by="alice")
        state = handle.result(timeout=30).state
    assert state["done"] is True and state["legal"]["by"] == "alice"
    child = sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid LIKE 'task-gate/%'")
    assert child == [("SUCCESS",)]
