"""The example FastAPI service over HTTP against Postgres (the App launches in the lifespan)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]


def load_service() -> ModuleType:
    spec = importlib.util.spec_from_file_location("durapipe_example_service", ROOT / "examples" / "service.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the body models' annotations here
    spec.loader.exec_module(module)
    return module


def test_start_run_status_and_result_over_http(database_url: str) -> None:
    service = load_service()
    service.demo.database_url = database_url
    with TestClient(service.create_service(service.demo, token="s3cret")) as http:
        assert http.get("/health").json()["pipelines"] == ["publish"]
        res = http.post("/runs", json={"pipeline": "publish", "inputs": {"topic": "AI"}, "run_id": "s1"})
        assert res.status_code == 202 and res.json()["run_id"] == "s1"
        deadline = time.monotonic() + 30
        while (body := http.get("/runs/s1").json())["status"] != "SUCCESS":
            assert time.monotonic() < deadline and body["status"] in ("PENDING", "ENQUEUED"), body
            time.sleep(0.05)
        assert body["state"] == {"topic": "AI", "draft": "A post about AI", "review": "Ship it.",
                                 "published": True}
        # same run id: the same run, not a new one
        assert http.post("/runs", json={"pipeline": "publish", "inputs": {"topic": "B"},
                                        "run_id": "s1"}).json()["status"] == "SUCCESS"
        assert http.get("/runs/none").status_code == 404
        assert http.post("/runs", json={"pipeline": "nope"}).status_code == 404
        res = http.post("/runs", json={"pipeline": "publish", "inputs": {}})
        assert res.status_code == 422 and "topic" in res.json()["detail"]


def test_approvals_need_the_bearer_token(database_url: str) -> None:
    service = load_service()
    service.demo.database_url = database_url
    with TestClient(service.create_service(service.demo, token="s3cret")) as http:
        url = "/runs/r1/gates/legal/approve"
        assert http.post(url, json={"by": "alice"}).status_code == 401
        assert http.post(url, json={"by": "alice"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.post(url.replace("approve", "reject"), json={"by": "alice"},
                         headers={"Authorization": "Basic s3cret"}).status_code == 401


@pytest.mark.slow
def test_dbos_start_serves_the_example(database_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, DURAPIPE_DATABASE_URL=database_url, DURAPIPE_SERVICE_TOKEN="t",
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
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
