"""The example FastAPI service over HTTP against Postgres (the App launches in the lifespan)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from dbutil import wait_for

ROOT = Path(__file__).resolve().parents[1]


def load_service() -> ModuleType:
    spec = importlib.util.spec_from_file_location("durapipe_example_service", ROOT / "examples" / "service.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the body models' annotations here
    spec.loader.exec_module(module)
    return module


def sse(text: str) -> list[dict[str, Any]]:
    """The events of a Server-Sent Events body: id, event and the JSON data of each."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        out.append({"id": int(fields["id"]), "event": fields["event"],
                    "data": json.loads(fields["data"])})
    return out


def test_start_run_status_result_and_events_over_http(database_url: str) -> None:
    service = load_service()
    service.demo.database_url = database_url
    with TestClient(service.create_service(service.demo, tokens={"s3cret": "alice"})) as http:
        assert http.get("/health").json()["pipelines"] == ["publish", "reviewed"]
        res = http.post("/runs", json={"pipeline": "publish", "inputs": {"topic": "AI"}, "run_id": "s1"})
        assert res.status_code == 202 and res.json()["run_id"] == "s1"
        res = http.get("/runs/s1/result", params={"timeout": 30})
        assert res.status_code == 200, res.text
        state = {"topic": "AI", "draft": "A post about AI", "review": "Ship it.", "published": True}
        assert res.json()["state"] == state and http.get("/runs/s1").json()["state"] == state
        # same run id: the same run, not a new one
        assert http.post("/runs", json={"pipeline": "publish", "inputs": {"topic": "B"},
                                        "run_id": "s1"}).json()["status"] == "SUCCESS"
        assert http.get("/runs/none").status_code == 404
        assert http.get("/runs/none/events").status_code == 404
        # a gate the run does not wait at: UnknownGate, a 404 naming it (never a 500)
        res = http.post("/runs/s1/gates/nope/approve", json={}, headers={"Authorization": "Bearer s3cret"})
        assert res.status_code == 404 and "nope" in res.json()["detail"], res.text
        assert http.post("/runs", json={"pipeline": "nope"}).status_code == 404
        res = http.post("/runs", json={"pipeline": "publish", "inputs": {}})
        assert res.status_code == 422 and "topic" in res.json()["detail"]

        # the event stream as SSE, through httpx on the ASGI app
        res = http.get("/runs/s1/events")
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        events = sse(res.text)
        assert [e["id"] for e in events] == list(range(len(events)))
        assert events[0]["event"] == "run_started" and events[-1]["event"] == "run_finished"
        tokens = [e["data"]["data"]["text"] for e in events if e["event"] == "token"]
        assert "".join(tokens) == "A post about AI"  # the writer streams its tokens
        # a client that reconnects with Last-Event-ID gets exactly the rest
        rest = sse(http.get("/runs/s1/events", headers={"Last-Event-ID": "4"}).text)
        assert rest == events[5:]
        assert sse(http.get("/runs/s1/events", params={"from_offset": 5}).text) == events[5:]
        quiet = sse(http.get("/runs/s1/events", params={"tokens": "false"}).text)
        assert quiet == [e for e in events if e["event"] != "token"]
        assert http.get("/runs/s1/events", headers={"Last-Event-ID": "x"}).status_code == 400


def test_approvals_name_the_person_from_the_dependency(database_url: str) -> None:
    service = load_service()
    service.demo.database_url = database_url
    with TestClient(service.create_service(service.demo, tokens={"s3cret": "alice"})) as http:
        url = "/runs/r1/gates/legal/approve"
        assert http.post(url, json={}).status_code == 401
        assert http.post(url, json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.post(url.replace("approve", "reject"), json={},
                         headers={"Authorization": "Basic s3cret"}).status_code == 401
        # the person comes from the token, never from the body
        res = http.post(url, json={"by": "mallory"}, headers={"Authorization": "Bearer s3cret"})
        assert res.status_code == 404 and "mallory" not in res.text  # no such run
        # the docstring's walk-through: a run of "reviewed" waits at "legal", alice answers
        http.post("/runs", json={"pipeline": "reviewed", "inputs": {"topic": "AI"}, "run_id": "r1"})
        wait_for(lambda: http.get("/gates").json(), what="the gate")
        assert [(g["run_id"], g["gate"]) for g in http.get("/gates").json()] == [("r1", "legal")]
        res = http.post(url, json={"by": "mallory", "comment": "ok"}, headers={"Authorization": "Bearer s3cret"})
        assert res.status_code == 200 and res.json()["by"] == "alice", res.text
        done = http.get("/runs/r1/result", params={"timeout": 30}).json()
        assert done["state"]["legal"]["by"] == "alice" and done["state"]["published"] is True
    with TestClient(service.create_service(service.demo, tokens={})) as http:
        assert http.post(url, json={}).status_code == 503  # no approver: answers refused


@pytest.mark.slow
def test_dbos_start_serves_the_example(database_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, DURAPIPE_DATABASE_URL=database_url, DURAPIPE_SERVICE_TOKENS="t=ops",
               DURAPIPE_SERVICE_PORT=str(port),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    dbos = Path(sys.executable).parent / "dbos"
    proc = subprocess.Popen([str(dbos), "start"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                res = httpx.post(f"{base}/runs",
                                 json={"pipeline": "publish", "inputs": {"topic": "x"}, "run_id": "d1"})
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "dbos start did not serve"
                time.sleep(0.2)
        assert res.status_code == 202
        while (body := httpx.get(f"{base}/runs/d1").json())["status"] != "SUCCESS":
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
        assert body["state"]["published"] is True
        # the SSE stream over a real socket: drop the connection after three events,
        # reconnect with Last-Event-ID, and get exactly the rest
        whole = sse(httpx.get(f"{base}/runs/d1/events", timeout=30).text)
        with httpx.stream("GET", f"{base}/runs/d1/events", timeout=30) as res:
            buffer = ""
            for chunk in res.iter_text():
                buffer += chunk
                if buffer.count("\n\n") >= 3:
                    break
        first = sse("\n\n".join(buffer.split("\n\n")[:3]))
        rest = sse(httpx.get(f"{base}/runs/d1/events", timeout=30,
                             headers={"Last-Event-ID": str(first[-1]["id"])}).text)
        assert first + rest == whole and whole[-1]["event"] == "run_finished"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
