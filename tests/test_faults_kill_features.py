"""SIGKILL inside a map, a loop, a route and a background task awaited by ``join(timeout=)``,
on both step paths (durapipe's one-statement steps and ``App(steps="dbos")``).

Pipeline (``tests/scripts/kill_features.py``), two runs at once:
``a >> map_over(xs, m) >> l * until(n == 3) >> route(lang) >> dispatch(bg) >> join(timeout=60) >> e``.
The process kills itself right after a chosen step's side effect. The exactly-once rule of
``test_faults_kill.py`` holds: a step recorded before the kill never runs again, only steps
in flight (at most the three map items of a run) run twice, every step has one row. After
recovery each run's result is complete and right (map results in item order, three loop
passes, the routed branch, the task's writes merged by the join, which did not time out),
and the join's deadline was recorded once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dbutil import kill_then_recover, sql

SCRIPT = Path(__file__).parent / "scripts" / "kill_features.py"
RUNS = 2
AFTER = {"a": set(), "m0": {"a"}, "m1": {"a"}, "m2": {"a"}, "l1": {"m0", "m1", "m2"},
         "l2": {"l1"}, "l3": {"l2"}, "r": {"l3"}, "bg": {"r"}, "e": {"bg"}}


def label_of(function_name: str) -> str | None:
    """``0.1.0#<i>:m`` is map item i, ``0.2.0#<k>:loop`` loop pass k + 1."""
    path, _, name = function_name.partition(":")
    if name == "m":
        return f"m{path.split('#')[1]}"
    if name == "loop":
        return f"l{int(path.split('#')[1]) + 1}"
    return name


@pytest.mark.slow
@pytest.mark.parametrize(("steps", "kill_at"), [
    ("lean", "f1:m1"), ("lean", "f0:l2"), ("lean", "f1:r"), ("lean", "f0:bg"),
    ("dbos", "f0:m2"), ("dbos", "f1:l3"), ("dbos", "f1:bg"),
])
def test_sigkill_in_map_loop_route_and_join_then_recover_runs_each_step_once(
        database_url: str, tmp_path: Path, steps: str, kill_at: str) -> None:
    kill_then_recover(SCRIPT, database_url, tmp_path / "effects.log", RUNS, kill_at, "f", AFTER, 3,
                      label_of, steps)
    assert sql(database_url, "SELECT workflow_uuid, count(*) FROM dbos.operation_outputs "
                             "WHERE function_name = '0.5:join:deadline' GROUP BY 1 ORDER BY 1") == [
        (f"f{i}", 1) for i in range(RUNS)]
