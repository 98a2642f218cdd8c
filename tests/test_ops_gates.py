"""Gates through the operator surfaces: `durapipe pending/approve`, the approvals view and
the service's approval endpoint. Needs the gate feature (``durapipe.gate``, ``app.approve``,
``app.pending``)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dbutil import sql, wait_for
from durapipe import App
from durapipe.audit import install_views
from durapipe.cli import cli

TESTS = Path(__file__).parent


def waiting(url: str, run_id: str) -> bool:
    res = CliRunner().invoke(cli, ["pending", "--json", "--run", run_id, "--database-url", url])
    return res.exit_code == 0 and any(g["gate"] == "legal" for g in json.loads(res.output))


def test_cli_pending_approve_and_the_approvals_view(database_url: str) -> None:
    sys.path.insert(0, str(TESTS))
    from ops import gates_app

    app: App = gates_app.app
    app.database_url = database_url
    try:
        with app:
            handle = gates_app.review.start({"title": "T"}, run_id="g1")
            wait_for(lambda: waiting(database_url, "g1"), what="the gate to be pending")
            assert [p.gate for p in app.pending("g1")] == ["legal"]
            install_views(database_url)
            assert sql(database_url, "SELECT gate, status, decided_by FROM durapipe.approvals") == [
                ("legal", "waiting", None)]
            proc = subprocess.run(
                [sys.executable, "-m", "durapipe.cli", "approve", "g1", "legal", "--by", "alice",
                 "--comment", "fine", "--app", "ops.gates_app", "--database-url", database_url],
                capture_output=True, text=True, timeout=120,
                env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])),
            )
            assert proc.returncode == 0, proc.stderr
            assert handle.result(timeout=30).state["published"] is True
    finally:
        app.shutdown()
    assert sql(database_url, "SELECT gate, status, decided_by, comment, decided_at IS NOT NULL, "
                             "requested_at IS NOT NULL FROM durapipe.approvals WHERE run_id = 'g1'") == [
        ("legal", "approved", "alice", "fine", True, True)]
    res = CliRunner().invoke(cli, ["show", "g1", "--json", "--database-url", database_url])
    assert res.exit_code == 0, (res.output, res.stderr if res.stderr_bytes else None, res.exception)
    gates = [n for n in json.loads(res.output)["nodes"] if n["kind"] == "gate"]
    assert [(g["name"], g["status"], g["detail"].get("by")) for g in gates] == [("legal", "APPROVED", "alice")]


def test_service_lists_and_approves_gates_with_the_token(database_url: str) -> None:
    sys.path.insert(0, str(TESTS))
    from ops import gates_app
    from test_service import load_service

    app: App = gates_app.app
    app.database_url = database_url
    service = load_service()
    with TestClient(service.create_service(app, tokens={"s3cret": "alice"})) as http:
        assert http.post("/runs", json={"pipeline": "review", "inputs": {"title": "T"},
                                        "run_id": "g2"}).status_code == 202
        wait_for(lambda: [g["gate"] for g in http.get("/gates").json()] == ["legal"], what="gate listed")
        url = "/runs/g2/gates/legal/approve"
        assert http.post(url, json={}).status_code == 401
        res = http.post(url, json={}, headers={"Authorization": "Bearer s3cret"})
        assert res.status_code == 200 and res.json()["by"] == "alice", res.text
        wait_for(lambda: http.get("/runs/g2").json()["status"] == "SUCCESS", what="run finished")
        assert http.get("/gates").json() == []


