"""Parallel branches of several steps run inline as steps of the parent workflow.

Their step numbers are reserved in branch order before any branch starts, so the
numbering is the same whatever the timing: a run killed mid fan-out replays cleanly.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dbutil import lines, spawn, sql, wait_for, wait_for_idle_database
from durapipe import fn, gate, route, transform, until

SCRIPT = Path(__file__).parent / "scripts" / "fanout_crash.py"
RUNS, BRANCHES = 6, 4


def rows_by_id(url: str, run_id: str) -> list[tuple[int, str]]:
    return [(int(fid), str(name)) for fid, name in sql(
        url, "SELECT function_id, function_name FROM dbos.operation_outputs WHERE workflow_uuid=%s "
             "ORDER BY function_id", run_id)]


def names_by_id(url: str, run_id: str) -> list[str]:
    return [name for _, name in rows_by_id(url, run_id)]


def canonical(names: list[str]) -> list[str]:
    """Names in the order the IR fixes: pre, branch 0's steps, branch 1's, ..., join."""
    def key(name: str) -> tuple[int, ...]:
        return tuple(int(p) for p in name.split(":")[0].split("."))
    return sorted(names, key=key)


def effect_of(run: int, name: str) -> str:
    """The log line of a recorded step: ``0.0`` is pre, ``0.2`` the join, ``0.1.<b>.<i>``
    branch b's node i (nodes 0, 2, 3 are its steps 0, 1, 2; node 1 is a transform)."""
    path = name.split(":")[0].split(".")
    if path == ["0", "0"]:
        return f"{run}:pre"
    if path == ["0", "2"]:
        return f"{run}:join"
    return f"{run}:{int(path[2])}.{[0, None, 1, 2][int(path[3])]}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_mid_fanout_replays_every_interleaving(database_url: str, tmp_path: Path,
                                                       seed: int) -> None:
    log = tmp_path / "effects.log"
    proc = spawn(SCRIPT, database_url, str(log), "crash", str(seed))
    try:
        wait_for(lambda: sum(x.startswith("blocked") for x in lines(log)) == RUNS, timeout=60,
                 what="every run to reach its blocking step")
        time.sleep(random.Random(seed).random() * 0.05)  # let other branches move on a bit
    finally:
        proc.kill()
        proc.wait()
    wait_for_idle_database(database_url)
    before = {r: rows_by_id(database_url, f"fan-{r}") for r in range(RUNS)}
    done_before = [x for x in lines(log) if not x.startswith("blocked")]
    assert len(done_before) == len(set(done_before))

    again = spawn(SCRIPT, database_url, str(log), "recover", str(seed))
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert "ERROR" not in out, out
    assert sorted(x for x in out.splitlines() if x.startswith("RESULT")) == [
        f"RESULT {r} {'012' * BRANCHES}" for r in range(RUNS)]

    effects = Counter(x for x in lines(log) if not x.startswith("blocked"))
    for r in range(RUNS):
        after = rows_by_id(database_url, f"fan-{r}")
        names = [name for _, name in after]
        # 1 + 4 x 3 + 1 steps, each recorded once, numbered in branch order, not time order.
        assert len(names) == 14 and len(set(names)) == 14
        assert names == canonical(names)
        # What was recorded before the kill kept its step number and its name.
        assert set(before[r]) <= set(after), (before[r], after)
        assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid=%s",
                   f"fan-{r}") == [("SUCCESS",)]
        # Every step ran. One recorded before the kill never ran again; one that ran but was
        # not recorded (in flight: at most one per branch still moving, so three) ran twice.
        recorded = {effect_of(r, name) for _, name in before[r]}
        assert recorded <= set(done_before)
        window = {x for x in done_before if x.startswith(f"{r}:")} - recorded
        assert len(window) <= BRANCHES - 1, window
        mine = {k: v for k, v in effects.items() if k.startswith(f"{r}:")}
        assert set(mine) == {f"{r}:pre", f"{r}:join"} | {
            f"{r}:{b}.{j}" for b in range(BRANCHES) for j in range(3)}
        assert mine == {k: 2 if k in window else 1 for k in mine}, (mine, window)
    assert len(done_before) >= RUNS  # each run had done its pre step at least


def test_fanout_of_sequences_starts_no_child_workflow(make_app: Any, database_url: str) -> None:
    seen: list[str] = []
    # The branches' first steps meet here: only branches running at the same time get past.
    meet = threading.Barrier(3, timeout=20)

    def step(name: str) -> Any:
        def body(state: dict[str, Any]) -> dict[str, Any]:
            seen.append(name)
            if name.startswith("a"):
                meet.wait()
            return {name: True}
        body.__name__ = name
        return fn(body)

    app = make_app("lean-par")
    branches = [step(f"a{b}") >> transform(lambda s: {}, name=f"t{b}") >> step(f"b{b}")
                for b in range(3)]
    p = app.pipeline("par", (branches[0] | branches[1] | branches[2]) >> step("end"))
    with app:
        res = p.run({}, run_id="lean-1")
    assert all(res.state[k] for k in ("a0", "b0", "a1", "b1", "a2", "b2", "end"))
    assert sql(database_url, "SELECT count(*) FROM dbos.workflow_status") == [(1,)]
    names = names_by_id(database_url, "lean-1")
    assert names == canonical(names) and len(names) == 7
    # Branches really ran concurrently: each branch's first step before any second step.
    assert {seen.index(f"a{b}") for b in range(3)} == {0, 1, 2}
    assert not meet.broken


def test_pure_nodes_write_no_rows(make_app: Any, database_url: str) -> None:
    """Transforms, route choices, loop tests, gate conditions and state merges: no rows."""
    app = make_app("lean-pure")
    t = transform(lambda s: {"k": s.get("k", 0) + 1}, name="inc")
    j = transform(lambda s: {"j": 1}, name="j")
    chosen = route("lang", {"en": transform(lambda s: {"out": "en"}, name="en"),
                            "fr": transform(lambda s: {"out": "fr"}, name="fr")})
    looped = t * until(lambda s: s["k"] >= 5, max=10)
    skipped = gate("ok", "approve {k}?", when=lambda s: False)
    p = app.pipeline("pure", t >> (t | j) >> chosen >> looped >> skipped >> t)
    with app:
        res = p.run({"lang": "fr"}, run_id="pure-1")
    assert res.state["k"] == 6 and res.state["j"] == 1 and res.state["out"] == "fr"
    assert sql(database_url, "SELECT count(*) FROM dbos.operation_outputs "
                             "WHERE workflow_uuid='pure-1'") == [(0,)]


def test_failed_branch_leaves_gaps_and_the_run_goes_on(make_app: Any, database_url: str) -> None:
    def ok(state: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    def boom(state: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("no")

    def plan_b(state: dict[str, Any]) -> dict[str, Any]:
        return {"b": True}

    def after(state: dict[str, Any]) -> dict[str, Any]:
        return {"after": True}

    app = make_app("lean-gap")
    broken = fn(ok, name="x1") >> fn(boom) >> fn(ok, name="x3")
    p = app.pipeline("gap", ((broken | fn(ok, name="y")) // fn(plan_b)) >> fn(after))
    with app:
        res = p.run({}, run_id="gap-1")
    assert res.state["b"] and res.state["after"]
    rows = sql(database_url, "SELECT function_id, function_name, error IS NOT NULL "
                             "FROM dbos.operation_outputs WHERE workflow_uuid='gap-1' "
                             "ORDER BY function_id")
    names = [r[1].split(":")[1] for r in rows]
    assert names[:3] == ["x1", "boom", "y"] and names[-2:] == ["plan_b", "after"]
    assert rows[1][2]  # boom's error is recorded; x3 never ran and left a gap
    assert rows[2][0] == rows[1][0] + 2
