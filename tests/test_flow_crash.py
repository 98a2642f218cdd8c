"""SIGKILL mid-flow with two steps done and two in flight: the restart finishes the flow and
runs nothing twice that had finished. Also: the onboarding example runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbutil import lines, spawn, sql, wait_for

SCRIPT = Path(__file__).with_name("flow_crash_script.py")


@pytest.mark.slow
def test_crash_mid_flow_resumes_without_rerunning_done_steps(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "effects.log"
    first = spawn(SCRIPT, database_url, str(log), "first")
    try:
        wait_for(lambda: {"a end", "b end", "c start", "d start"} <= set(lines(log)), 60,
                 "a and b done, c and d in flight")

        def done_children() -> set[str]:
            try:
                rows = sql(database_url, "SELECT workflow_uuid FROM dbos.workflow_status "
                                         "WHERE parent_workflow_id = 'crash-1' AND status = 'SUCCESS'")
            except Exception:
                return set()
            return {r[0] for r in rows}

        wait_for(lambda: done_children() == {"crash-1/0.0:a", "crash-1/0.1:b"}, 30, "a and b recorded")
    finally:
        first.kill()
        first.wait(10)
    assert "e start" not in lines(log)

    again = spawn(SCRIPT, database_url, str(log), "again")
    out, _ = again.communicate(timeout=90)
    assert again.returncode == 0, out
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result == {"x": 1, "ka": "a", "kb": "b", "kc": "c", "kd": "d", "e": "e"}
    effects = lines(log)
    # Done steps ran once; the in-flight ones started twice but finished once.
    for name in ("a", "b", "e"):
        assert effects.count(f"{name} start") == 1 and effects.count(f"{name} end") == 1, effects
    for name in ("c", "d"):
        assert effects.count(f"{name} start") == 2 and effects.count(f"{name} end") == 1, effects
    assert effects.index("e start") > max(effects.index(f"{n} end") for n in "abcd")
    status = sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'crash-1'")
    assert status == [("SUCCESS",)]


@pytest.mark.slow
def test_onboarding_example_runs(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURAPIPE_DATABASE_URL", database_url)
    proc = spawn(Path(__file__).parents[1] / "examples" / "onboarding.py")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "not needed: upsell-offer" in out and "    s0 -- document_url --> s3" in out
    run = out.split("run:\n", 1)[1]
    assert run.index("start  complete-onboarding") > run.index("end    generate-documents")
    assert "onboarding_complete: True" in out and "offer" not in run
