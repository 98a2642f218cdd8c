"""The web console over real runs on Postgres (FastAPI's TestClient): runs list with filters
and keyset paging, the run page's diagram, timeline and steps, approvals that only an
authenticated allowed person can give, and cancel/resume/fork."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import Header, HTTPException
from fastapi.testclient import TestClient

from dbutil import wait_for
from durapipe import Agent, App, FakeModel, dispatch, fn, gate, join
from durapipe.web import create_console

HTML = {"accept": "text/html"}
TOKENS = "alice:alice-secret,bob:bob-secret"


def draft(state: dict[str, Any]) -> dict[str, Any]:
    return {"draft": f"about {state['topic']}"}


def publish(state: dict[str, Any]) -> dict[str, Any]:
    return {"published": True}


def broken(state: dict[str, Any]) -> dict[str, Any]:
    raise KeyError("missing")


BOTH = threading.Barrier(2, timeout=30)  # the two branches run at the same time


def left(state: dict[str, Any]) -> dict[str, Any]:
    BOTH.wait()
    time.sleep(0.05)  # so each bar ends after the other began, whatever the clock's resolution
    return {"left": 1}


def right(state: dict[str, Any]) -> dict[str, Any]:
    BOTH.wait()
    time.sleep(0.05)
    return {"right": 1}


def build(make_app: Callable[..., App]) -> App:
    app = make_app("web-test", model=FakeModel({"writer": "a short draft", "summarizer": "in short"}))
    app.pipeline("review", fn(draft) >> gate("legal", "Publish {topic}?", approvers=["alice"])
                 >> fn(publish), inputs=["topic"])
    app.pipeline("quick", fn(draft), inputs=["topic"])
    app.pipeline("bad", fn(broken))
    app.pipeline("fanout", Agent("writer").instruct("Write about {topic}").writes("draft")
                 >> dispatch(Agent("summarizer").instruct("Sum up {draft}").writes("summary"), names=["sum"])
                 >> (fn(left) | fn(right)) >> join("sum"), inputs=["topic"])
    return app


@pytest.fixture
def app(make_app: Callable[..., App]) -> Iterator[App]:
    app = build(make_app)
    with app:
        yield app


def statuses(html: str) -> dict[str, str]:
    return dict(re.findall(r'class="box [^"]*" data-path="([\d.]+)" data-status="(\w+)"', html))


def start_review(app: App, run_id: str, topic: str = "durable AI") -> None:
    _pipeline(app, "review").start({"topic": topic}, run_id=run_id)
    wait_for(lambda: app.pending(run_id), what=f"{run_id} to wait at its gate")


def _pipeline(app: App, name: str) -> Any:
    from durapipe import Pipeline

    return Pipeline(app, app.registered(name))


def test_runs_list_filters_and_pages(app: App) -> None:
    quick = _pipeline(app, "quick")
    for i in range(5):
        quick.run({"topic": f"topic-{i}"}, run_id=f"q{i}")
    bad = _pipeline(app, "bad").start({}, run_id="bad-1")
    wait_for(lambda: bad.status().finished, what="the failing run to end")
    with TestClient(create_console(app, page_size=2)) as client:
        page = client.get("/", headers=HTML).text
        assert re.findall(r'href="/runs/([\w-]+)"', page) == ["bad-1", "q4"]
        seen = []
        url = "/?pipeline=quick"
        while url:
            page = client.get(url, headers=HTML).text
            seen += re.findall(r'href="/runs/([\w-]+)"', page)
            nxt = re.search(r'class="next" href="([^"]+)"', page)
            url = nxt.group(1).replace("&amp;", "&") if nxt else ""
        assert seen == ["q4", "q3", "q2", "q1", "q0"]  # newest first, each once, across pages
        errors = client.get("/?status=error", headers=HTML).text
        assert re.findall(r'href="/runs/([\w-]+)"', errors) == ["bad-1"]
        assert "KeyError" in errors
        found = client.get("/?q=topic-3", headers=HTML).text
        assert re.findall(r'href="/runs/([\w-]+)"', found) == ["q3"]
        assert "no runs match" in client.get("/?since=2099-01-01", headers=HTML).text
        assert client.get("/?status=nope", headers=HTML).status_code == 400


def test_run_page_shows_diagram_timeline_and_steps(app: App) -> None:
    start_review(app, "r1")
    with TestClient(create_console(app, token=TOKENS)) as client:
        page = client.get("/runs/r1", headers=HTML).text
        assert statuses(page) == {"0.0": "SUCCESS", "0.1": "WAITING", "0.2": "PENDING"}
        assert 'class="tl-bar st-success" data-path="0.0"' in page  # the finished step's bar
        assert re.search(r'<span class="tl-label">0.1 gate legal</span><div class="tl-track">'
                         r'<div class="tl-bar st-waiting"', page)  # the wait for a person, so far
        assert "about durable AI" in page                            # its output
        assert 'data-gate="legal"' in page and "approvers: alice" in page
        assert "&quot;topic&quot;: &quot;durable AI&quot;" in page                       # the inputs
        live = client.get("/runs/r1/live", headers=HTML).text
        assert 'data-run-active="1"' in live and "<html" not in live
        bad = _pipeline(app, "bad").start({}, run_id="b1")
        wait_for(lambda: bad.status().finished, what="the failing run to end")
        failed = client.get("/runs/b1", headers=HTML).text
        assert statuses(failed) == {"0": "ERROR"} and "KeyError" in failed
        assert client.get("/runs/nope", headers=HTML).status_code == 404
        assert client.get("/api/runs/r1").json()["statuses"]["0.1"] == "WAITING"


def bars(html: str) -> dict[str, tuple[float, float]]:
    """node path -> (left, right) of its timeline bar, in % of the run's time axis."""
    found = re.findall(r'class="tl-bar [^"]*" data-path="([\d.]+)" style="left:([\d.]+)%;width:([\d.]+)%"', html)
    return {p: (float(a), float(a) + float(w)) for p, a, w in found}


def test_run_page_shows_parallel_work_tokens_and_tasks(app: App) -> None:
    _pipeline(app, "fanout").run({"topic": "durable AI"}, run_id="f1")
    with TestClient(create_console(app)) as client:
        page = client.get("/runs/f1", headers=HTML).text
    assert set(statuses(page).values()) == {"SUCCESS"}  # the join that ends the run included
    (a0, a1), (b0, b1) = bars(page)["0.2.0"], bars(page)["0.2.1"]
    assert a0 < b1 and b0 < a1  # the branches' bars overlap: they ran at the same time
    assert "0.3" in bars(page)  # the join's wait for its task, from the run's events
    assert re.search(r"<td>0\.0</td><td>writer</td>.*?<td>fake \d+→\d+ tok</td>", page, re.S)
    assert re.search(r"<td>0\.1\.0</td><td>summarizer</td><td>step</td>.*?fake \d+→\d+ tok", page, re.S)
    assert re.search(r"<h2>Background tasks</h2><ul><li>sum: .*?SUCCESS.*? task sum: joined</li>", page)
    assert "tokens " in page  # the run's total in its head line


def test_approvals_need_an_authenticated_allowed_person(app: App) -> None:
    start_review(app, "r2")
    with TestClient(create_console(app, token=TOKENS)) as client:
        assert "r2" in client.get("/approvals", headers=HTML).text
        refused = client.post("/runs/r2/gates/legal/approve", headers=HTML, follow_redirects=False)
        assert refused.status_code == 401 and "sign in" in refused.text.lower()
        wrong = client.post("/runs/r2/gates/legal/approve", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        bob = client.post("/runs/r2/gates/legal/approve", headers={"authorization": "Bearer bob-secret"})
        assert bob.status_code == 403 and "bob" in bob.json()["detail"]
        assert [g.gate for g in app.pending("r2")] == ["legal"]       # nothing changed
        login = client.post("/login", data={"token": "alice-secret", "next": "/runs/r2"},
                            follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/runs/r2"
        for outside in ("//evil.example/x", "/\\evil.example", "https://evil.example/"):
            away = client.post("/login", data={"token": "alice-secret", "next": outside},
                               follow_redirects=False)
            assert away.headers["location"] == "/"  # a sign-in never sends you off the console
        assert client.post("/login", data={"token": "nope"}).status_code == 401
        done = client.post("/runs/r2/gates/legal/approve", data={"comment": "fine"}, headers=HTML)
        assert done.status_code == 200 and "approved gate legal as alice" in done.text
        wait_for(lambda: app.get_run("r2").status().finished, what="the approved run to end")
        page = client.get("/runs/r2", headers=HTML).text
        assert statuses(page) == {"0.0": "SUCCESS", "0.1": "APPROVED", "0.2": "SUCCESS"}
        assert "signed in: alice" in page


def test_read_only_without_tokens_and_auth_dependency(app: App) -> None:
    start_review(app, "r3")
    with TestClient(create_console(app, token="")) as client:
        res = client.post("/runs/r3/cancel")
        assert res.status_code == 403 and "DURAPIPE_UI_TOKEN" in res.json()["detail"]

    def who(x_user: str | None = Header(default=None)) -> str:
        if not x_user:
            raise HTTPException(401, "no user")
        return x_user

    with TestClient(create_console(app, auth=who)) as client:
        assert client.post("/runs/r3/gates/legal/reject").status_code == 401
        res = client.post("/runs/r3/gates/legal/reject", headers={"x-user": "alice"}, follow_redirects=False)
        assert res.status_code == 303, res.text
    handle = app.get_run("r3")
    wait_for(lambda: handle.status().finished, what="the rejected run to end")
    assert handle.status().value == "ERROR"


def test_cancel_resume_and_fork(app: App) -> None:
    start_review(app, "r4")
    _pipeline(app, "quick").run({"topic": "forked"}, run_id="q-fork")
    auth = {"authorization": "Bearer alice-secret"}
    with TestClient(create_console(app, token=TOKENS)) as client:
        res = client.post("/runs/r4/cancel", headers=auth, follow_redirects=False)
        assert res.status_code == 303
        handle = app.get_run("r4")
        wait_for(lambda: handle.status().value == "CANCELLED", what="the run to be cancelled")
        cancelled = client.get("/runs/r4", headers=HTML).text
        assert 'action="/runs/r4/resume"' in cancelled
        assert statuses(cancelled)["0.1"] == "UNANSWERED"  # never WAITING under an ended run
        assert cancelled.count('data-path="0.1"><td>0.1</td><td>legal</td>') == 1  # the gate, once
        res = client.post("/runs/r4/resume", headers=auth, follow_redirects=False)
        assert res.status_code == 303
        wait_for(lambda: app.pending("r4"), what="the resumed run to wait at its gate again")
        res = client.post("/runs/q-fork/fork", data={"node": "0"}, headers=auth, follow_redirects=False)
        assert res.status_code == 303
        new_id = res.headers["location"].split("/runs/")[1].split("?")[0]
        assert new_id != "q-fork"
        wait_for(lambda: client.get(f"/api/runs/{new_id}").json()["run"]["status"] == "SUCCESS",
                 what="the fork to finish")
        assert client.get(f"/runs/{new_id}", headers=HTML).text.count("forked from") >= 1
        unknown = client.post("/runs/nope/cancel", headers=auth)
        assert unknown.status_code == 404
