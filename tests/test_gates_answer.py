"""Answering a gate: the decision is on record when `app.approve` returns, a gate answered
once refuses every later answer (also among answers sent at the same moment), and the
run's own record of the decision (what a fork restores) follows."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dbutil import sql, wait_for
from durapipe import App, GateRejected, fn, gate
from durapipe.errors import ApprovalRefused, UnknownGate, UnknownRun

S = dict[str, Any]


def events(url: str, run_id: str, key: str) -> tuple[Any, list[Any]]:
    """The event's current value and its recorded history, oldest first."""
    now = sql(url, "SELECT value FROM dbos.workflow_events WHERE workflow_uuid = %s AND key = %s",
              run_id, key)
    history = sql(url, "SELECT value FROM dbos.workflow_events_history WHERE workflow_uuid = %s "
                       "AND key = %s ORDER BY function_id", run_id, key)
    return (json.loads(now[0][0]) if now else None), [json.loads(v) for (v,) in history]


def test_the_decision_is_on_record_when_approve_returns(make_app: Callable[..., App],
                                                        database_url: str) -> None:
    release = threading.Event()

    def publish(state: S) -> S:
        release.wait(30)
        return {"published": True}

    app = make_app()
    p = app.pipeline("p", gate("legal", "ok?", approvers=["alice", "bob"]) >> fn(publish))
    with app:
        h = p.start({}, run_id="rec-1")
        wait_for(lambda: bool(app.pending("rec-1")), what="gate announced")
        [pg] = app.pending("rec-1")
        app.approve("rec-1", "legal", by="alice", comment="fine")
        # Before the run has gone any further: the event already holds the decision.
        now, _ = events(database_url, "rec-1", "gate:legal")
        assert now == {"gate": "legal", "status": "approved", "by": "alice", "comment": "fine",
                       "decided_at": now["decided_at"], "message": "ok?",
                       "approvers": ["alice", "bob"], "requested_at": pg.requested_at}
        assert app.pending("rec-1") == [] and app.pending() == []
        with pytest.raises(UnknownGate, match=r"not waiting at gate 'legal': it was already "
                                              r"approved by 'alice'"):
            app.reject("rec-1", "legal", by="bob", comment="too late")
        with pytest.raises(UnknownGate, match="already approved"):
            app.approve("rec-1", "legal", by="alice")
        release.set()
        state = h.result(timeout=30).state
    assert state["legal"] == {"approved": True, "by": "alice", "comment": "fine",
                              "at": now["decided_at"]}
    final, history = events(database_url, "rec-1", "gate:legal")
    assert final == now  # the refused answers changed nothing
    # The run recorded the waiting request and then the same decision itself.
    assert [h["status"] for h in history] == ["waiting", "approved"] and history[-1] == now
    rows = sql(database_url, "SELECT count(*) FROM dbos.notifications WHERE destination_uuid = 'rec-1'")
    assert rows[0][0] == 1


@pytest.mark.parametrize("decisions", [["approve"] * 6, ["reject", "approve"] * 3])
def test_of_answers_sent_at_once_exactly_one_applies(
    make_app: Callable[..., App], database_url: str, decisions: list[str]
) -> None:
    app = make_app()
    p = app.pipeline("p", gate("legal", "ok?") >> fn(lambda s: {"published": True}, name="publish"))
    start = threading.Barrier(len(decisions))

    def answer(i: int) -> str | None:
        decide = app.approve if decisions[i] == "approve" else app.reject
        start.wait()
        try:
            decide("once-1", "legal", by=f"person{i}")
            return f"person{i}"
        except UnknownGate:
            return None

    with app:
        h = p.start({}, run_id="once-1")
        wait_for(lambda: bool(app.pending("once-1")), what="gate announced")
        with ThreadPoolExecutor(len(decisions)) as pool:
            outcomes = list(pool.map(answer, range(len(decisions))))
        [winner] = [o for o in outcomes if o is not None]
        won_with = decisions[int(winner.removeprefix("person"))]
        if won_with == "approve":
            assert h.result(timeout=30).state["legal"]["by"] == winner
        else:
            with pytest.raises(GateRejected) as e:
                h.result(timeout=30)
            assert e.value.by == winner
    final, _ = events(database_url, "once-1", "gate:legal")
    assert final["by"] == winner and final["status"] == {"approve": "approved", "reject": "rejected"}[won_with]
    rows = sql(database_url, "SELECT count(*) FROM dbos.notifications WHERE destination_uuid = 'once-1'")
    assert rows[0][0] == 1


def test_answers_on_sqlite(tmp_path: Any) -> None:
    app = App("sqlite-gates", f"sqlite:///{tmp_path}/gates.sqlite")
    p = app.pipeline("p", gate("legal", "ok?", approvers=["alice"])
                     >> fn(lambda s: {"published": True}, name="publish"))
    try:
        with app:
            h = p.start({}, run_id="lite-1")
            wait_for(lambda: bool(app.pending("lite-1")), what="gate announced")
            with pytest.raises(ApprovalRefused):
                app.approve("lite-1", "legal", by="mallory")
            app.approve("lite-1", "legal", by="alice", comment="ok")
            assert app.pending("lite-1") == []
            with pytest.raises(UnknownGate, match="already approved by 'alice'"):
                app.approve("lite-1", "legal", by="alice")
            state = h.result(timeout=30).state
    finally:
        app.shutdown()
    assert state["published"] is True and state["legal"]["by"] == "alice"


def test_a_gate_of_another_apps_run_is_not_answered(make_app: Callable[..., App],
                                                    database_url: str) -> None:
    other = make_app("other-app")
    p = other.pipeline("p", gate("legal", "ok?") >> fn(lambda s: {"published": True}, name="publish"))
    with other:
        p.start({}, run_id="theirs-1")
        wait_for(lambda: bool(other.pending("theirs-1")), what="gate announced")
    # As if the other app's worker still ran it (this process's shutdown ended it).
    sql(database_url, "UPDATE dbos.workflow_status SET status = 'PENDING' "
                      "WHERE workflow_uuid = 'theirs-1'")
    mine = make_app("my-app")
    with mine:
        with pytest.raises(UnknownRun, match="has no run with id 'theirs-1'"):
            mine.approve("theirs-1", "legal", by="alice")
    now, _ = events(database_url, "theirs-1", "gate:legal")
    assert now["status"] == "waiting"
    assert sql(database_url, "SELECT count(*) FROM dbos.notifications")[0][0] == 0
