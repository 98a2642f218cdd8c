"""Hostile strings in run ids, pipeline, node, gate and task names, comments and state values.

The CLI filters and the SQL audit views must treat them as data: parameters only, exact
results, nothing executed (the dbos tables and a canary table survive), and the terminal
output shows the text literally (no Rich markup, no raw escape sequences), never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from dbutil import sql, wait_for
from durapipe import RunStatus
from durapipe.audit import install_views
from durapipe.cli import cli
from ops import hostile_app
from ops.hostile_app import DROP, GATE, MESSAGE, NODE, TASK

APP_FILE = str(Path(__file__).parent / "ops" / "hostile_app.py")
runner = CliRunner()
TITLE = "t'itle\"; SELECT pg_sleep(10); -- 50% [/] \\ $$ ünï 🚀 \t\x1b[31m\x07\x01"
RUN_IDS = [DROP, "r\"1; --", "r%_2", "ünï-🚀-[/]", "ctl\t\x1b[2J\x7f"]
BY = "o'brien\"; --"
COMMENT = "ok'); DELETE FROM dbos.workflow_events; -- [bold]%[/]"


def cli_ok(*args: str) -> str:
    res = runner.invoke(cli, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def intact(url: str, counts: dict[str, int]) -> None:
    for table in ("workflow_status", "operation_outputs", "workflow_events"):
        assert sql(url, f"SELECT count(*) FROM dbos.{table}")[0][0] >= counts[table], table
    assert sql(url, "SELECT note FROM public.canary") == [("alive",)]


def test_hostile_strings_are_data_everywhere(database_url: str) -> None:
    app = hostile_app.app
    app.database_url = database_url
    sql(database_url, "CREATE TABLE public.canary (note text)")
    sql(database_url, "INSERT INTO public.canary VALUES ('alive')")
    with app:
        for rid in RUN_IDS:
            assert hostile_app.plain.run({"title": TITLE}, run_id=rid).state["bg"] == TITLE
        waiting = hostile_app.gated.start({"title": TITLE}, run_id=f"g{DROP}")
        wait_for(lambda: len(app.pending(waiting.run_id)) == 1, what="the gate")
        install_views(database_url)
        counts = {t: sql(database_url, f"SELECT count(*) FROM dbos.{t}")[0][0]
                  for t in ("workflow_status", "operation_outputs", "workflow_events")}

        # -- CLI filters and lookups -------------------------------------------------------
        rows = json.loads(cli_ok("runs", "--pipeline", DROP, "--json", "--database-url", database_url))
        assert sorted(r["run_id"] for r in rows) == sorted(RUN_IDS)
        assert {r["pipeline"] for r in rows} == {DROP}
        for wildcard in ("%", "_", "x%", "' OR '1'='1"):
            out = cli_ok("runs", "--pipeline", wildcard, "--json", "--database-url", database_url)
            assert json.loads(out) == []
        table = cli_ok("runs", "--pipeline", DROP, "--database-url", database_url)
        assert "[/" in table and "\x1b" not in table and "\\x1b" in table

        for rid in RUN_IDS:
            tree = json.loads(cli_ok("show", rid, "--json", "--database-url", database_url))
            assert tree["run"]["run_id"] == rid
            assert tree["nodes"][0]["name"] == NODE
            assert tree["output"]["echo"] == TITLE
            task = next(n for n in tree["nodes"] if n["kind"] == "task")
            assert task["detail"]["task"] == TASK
            text = cli_ok("show", rid, "--database-url", database_url)
            assert "[/]" in text and "\x1b" not in text
        res = runner.invoke(cli, ["show", "no'; DROP TABLE dbos.workflow_status; -- [/]",
                                  "--database-url", database_url])
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert "no'; DROP TABLE dbos.workflow_status; -- [/]" in res.output

        gates = json.loads(cli_ok("pending", "--json", "--database-url", database_url))
        assert [(g["run_id"], g["gate"], g["message"]) for g in gates] == [
            (waiting.run_id, GATE, MESSAGE.replace("{title}", TITLE))]
        text = cli_ok("pending", "--database-url", database_url)
        assert "[red]%_" in text and "\x1b" not in text

        proc = subprocess.run(
            [sys.executable, "-m", "durapipe.cli", "approve", waiting.run_id, GATE, "--by", BY,
             "--comment", COMMENT, "--app", APP_FILE, "--database-url", database_url],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert waiting.result(timeout=60).status is RunStatus.SUCCESS
        intact(database_url, counts)

    # -- the views, queried with hostile values as parameters ------------------------------
    q = "SELECT run_id, pipeline, status FROM durapipe.runs WHERE pipeline = %s ORDER BY run_id"
    assert sql(database_url, q, DROP) == sorted((rid, DROP, "SUCCESS") for rid in RUN_IDS)
    like = "SELECT count(*) FROM durapipe.runs WHERE pipeline LIKE %s"
    assert sql(database_url, like, "%'; DROP%") == [(len(RUN_IDS),)]
    for rid in RUN_IDS:
        steps = sql(database_url, "SELECT node_path, node_name, kind FROM durapipe.steps "
                                  "WHERE workflow_id = %s AND kind <> 'dbos-op' ORDER BY step_id", rid)
        assert steps[0] == ("0.0", NODE, "step")
        tasks = sql(database_url, "SELECT task, status, child_workflow_id FROM durapipe.background_tasks "
                                  "WHERE run_id = %s", rid)
        assert tasks == [(TASK, "joined", f"{rid}/0.1.0:{TASK}")]
        state = sql(database_url, "SELECT output->>'echo' FROM durapipe.runs WHERE run_id = %s", rid)
        assert state == [(TITLE,)]
    assert sql(database_url, "SELECT run_id FROM durapipe.steps WHERE node_name = %s AND run_id = %s",
               NODE, RUN_IDS[3]) == [(RUN_IDS[3],)]
    approvals = sql(database_url, "SELECT run_id, gate, status, message, decided_by, comment "
                                  "FROM durapipe.approvals WHERE gate = %s AND comment = %s",
                    GATE, COMMENT)
    assert approvals == [(f"g{DROP}", GATE, "approved", MESSAGE.replace("{title}", TITLE), BY, COMMENT)]
    intact(database_url, counts)
    found: Any = sql(database_url, "SELECT to_regclass('dbos.workflow_status') IS NOT NULL")
    assert found == [(True,)]
