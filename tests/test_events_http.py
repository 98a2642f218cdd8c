"""``durapipe.fastapi`` as a user mounts it: a run followed live over SSE on a real uvicorn
(loopback), dropped at a gate and resumed with ``Last-Event-ID``; the gate listed and
answered by the person a FastAPI dependency names; a rejected run's result; unknown ids."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException

from dbutil import wait_for
from durapipe import App, fn, gate
from durapipe.fastapi import durapipe_router
from test_service import sse


def prep(state: dict[str, Any]) -> dict[str, Any]:
    return {"draft": "d"}


def done(state: dict[str, Any]) -> dict[str, Any]:
    return {"done": True}


def who(x_user: str | None = Header(default=None)) -> str:
    """The approver dependency: the person a (trusted) proxy header names."""
    if not x_user:
        raise HTTPException(401, "who are you?")
    return x_user


@pytest.fixture
def served(make_app: Callable[..., App]) -> Iterator[tuple[App, FastAPI, str]]:
    app = make_app("events-http")
    app.pipeline("review", fn(prep) >> gate("legal", "Ship {draft}?") >> fn(done))
    api = FastAPI()
    api.include_router(durapipe_router(app, approver=who, prefix="/api"))
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=0, lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    with app:
        thread.start()
        wait_for(lambda: server.started, what="uvicorn to serve")
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield app, api, f"http://127.0.0.1:{port}/api"
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def read_until(res: httpx.Response, event: str) -> list[dict[str, Any]]:
    """The SSE events of a live response up to and including the first ``event``."""
    buffer = ""
    for chunk in res.iter_text():
        buffer += chunk
        blocks = [b for b in buffer.split("\n\n")[:-1] if b.strip()]
        if any(f"event: {event}\n" in b + "\n" for b in blocks):
            return sse("\n\n".join(blocks))
    raise AssertionError(f"the stream ended before {event}: {buffer}")


def test_follow_live_resume_and_answer_over_http(served: tuple[App, FastAPI, str]) -> None:
    app, api, base = served
    with httpx.Client(base_url=base, timeout=30) as http:
        res = http.post("/runs", json={"pipeline": "review", "inputs": {}, "run_id": "h-1"})
        assert res.status_code == 202 and res.json()["run_id"] == "h-1"
        again = http.post("/runs", json={"pipeline": "review", "inputs": {"x": 1}, "run_id": "h-1"})
        assert again.status_code == 202 and again.json()["run_id"] == "h-1"  # the same run
        # follow live; drop the connection once the run waits at the gate
        with http.stream("GET", "/runs/h-1/events") as live:
            first = read_until(live, "gate_waiting")
        assert first[-1]["data"]["data"]["message"] == "Ship d?"
        assert http.get("/runs/h-1").json()["status"] == "PENDING"
        assert http.get("/runs/h-1/result", params={"timeout": 0}).status_code == 202
        listed = http.get("/gates").json()
        assert [(g["run_id"], g["gate"], g["message"]) for g in listed] == [("h-1", "legal", "Ship d?")]
        assert http.get("/runs/h-1/gates").json() == listed
        approve = "/runs/h-1/gates/legal/approve"
        assert http.post(approve, json={"comment": "ok"}).status_code == 401
        res = http.post(approve, json={"comment": "ok", "by": "mallory"}, headers={"X-User": "bob"})
        assert res.status_code == 200 and res.json()["by"] == "bob"  # never the body's "by"
        rest = sse(http.get("/runs/h-1/events",
                            headers={"Last-Event-ID": str(first[-1]["id"])}).text)
        result = http.get("/runs/h-1/result", params={"timeout": 30})
        assert result.status_code == 200 and result.json()["state"]["done"] is True

        http.post("/runs", json={"pipeline": "review", "run_id": "h-2"})
        wait_for(lambda: bool(http.get("/runs/h-2/gates").json()), what="the second gate")
        res = http.post("/runs/h-2/gates/legal/reject", json={"comment": "no"},
                        headers={"X-User": "carol"})
        assert res.status_code == 200 and res.json()["decision"] == "rejected"
        failed = http.get("/runs/h-2/result", params={"timeout": 30})
        assert failed.status_code == 409 and "carol" in failed.json()["error"]
        assert http.get("/runs/h-2").json()["status"] == "ERROR"

        for url in ("/runs/nope", "/runs/nope/result", "/runs/nope/gates", "/runs/nope/events"):
            assert http.get(url).status_code == 404, url
        for url in ("/runs/nope/gates/legal/approve", "/runs/h-2/gates/nope/reject"):
            assert http.post(url, json={}, headers={"X-User": "bob"}).status_code == 404, url
        assert http.post("/runs", json={"pipeline": "nope"}).status_code == 404

    async def whole_over_asgi() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://t/api") as client:
            whole = sse((await client.get("/runs/h-1/events")).text)
            tail = sse((await client.get("/runs/h-1/events", headers={"Last-Event-ID": "2"})).text)
            return whole, tail
    whole, tail = asyncio.run(whole_over_asgi())
    assert first + rest == whole and tail == whole[3:]
    assert [e["id"] for e in whole] == list(range(len(whole)))
    answered = next(e for e in whole if e["event"] == "gate_answered")
    assert answered["data"]["data"]["by"] == "bob" and whole[-1]["event"] == "run_finished"
    assert json.dumps(whole).count("mallory") == 0
