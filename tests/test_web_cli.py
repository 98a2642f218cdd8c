"""`durapipe ui` as a user starts it: a process serving the console on 127.0.0.1 for the
App of a module, read-only without DURAPIPE_UI_TOKEN, changes allowed with it. It never
launches the App: it answers a gate from the database alone, also while no process runs the
run, and the next process that resumes the run goes on from that answer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from dbutil import sql, wait_for
from durapipe import App

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(database_url: str, port: int, token: str | None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("DURAPIPE_UI_TOKEN", None)
    if token:
        env["DURAPIPE_UI_TOKEN"] = token
    return subprocess.Popen([sys.executable, "-m", "durapipe.cli", "ui", "--app", "ops.gates_app",
                             "--port", str(port), "--database-url", database_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_durapipe_ui_serves_the_apps_runs(database_url: str) -> None:
    sys.path.insert(0, str(TESTS))
    from ops import gates_app

    app: App = gates_app.app
    app.database_url = database_url
    with app:
        gates_app.review.start({"title": "T"}, run_id="ui-1")
        wait_for(lambda: app.pending("ui-1"), what="the gate")
    # Stopped cleanly: the run is PENDING at its gate and no process executes it.
    check_console(database_url)
    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'ui-1'") \
        == [("PENDING",)]  # the console recovered nothing
    with app:
        assert app.get_run("ui-1").result(timeout=30).state["published"] is True


def check_console(database_url: str) -> None:
    port = free_port()
    proc = serve(database_url, port, None)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(base + "/"), timeout=60, what="durapipe ui to listen")
        assert 'href="/runs/ui-1"' in httpx.get(base + "/").text
        assert httpx.get(base + "/", headers={"host": "rebound.example"}).status_code == 400
        page = httpx.get(base + "/runs/ui-1").text
        assert 'data-gate="legal"' in page and 'data-status="WAITING"' in page
        refused = httpx.post(base + "/runs/ui-1/gates/legal/approve", data={"by": "alice"})
        assert refused.status_code == 403 and "DURAPIPE_UI_TOKEN" in refused.json()["detail"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}/ (read-only: set DURAPIPE_UI_TOKEN" in out

    port = free_port()
    proc = serve(database_url, port, "alice:s3cret")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(base + "/"), timeout=60, what="durapipe ui to listen")
        done = httpx.post(base + "/runs/ui-1/gates/legal/approve", headers={"authorization": "Bearer s3cret"})
        assert done.status_code == 303 and "approved+gate+legal+as+alice" in done.headers["location"]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
