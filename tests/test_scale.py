"""Scale: a big map runs on bounded threads, and children get what they read, not copies.

- ``map_over`` without ``concurrency=`` runs at most ``bounds.limit()`` items at once and
  sync step bodies run on durapipe's bounded executor: a map of 10,000 items never holds
  more than a few dozen threads or more connections than DBOS's pool and a few, and DBOS's
  pool never times out.
- A child workflow (map item with a multi-step body, dispatched task) gets the keys its
  subtree reads, or a reference to one recorded snapshot of the parent's state: the bytes
  a map writes grow linearly with the items, not with items x state.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from dbutil import bytes_written, kill_then_recover, sql
from durapipe import dispatch, fn, join, map_over
from durapipe.engine import bounds

S = dict[str, Any]


class Peak:
    """The most threads alive in the process, as seen from inside the step bodies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.most = 0

    def see(self) -> None:
        n = threading.active_count()
        with self.lock:
            self.most = max(self.most, n)


@pytest.mark.slow  # 10,000 items: about a minute on 2 shared cores
def test_big_map_runs_on_bounded_threads_without_pool_timeouts(
        make_app: Any, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    peak = Peak()

    def tiny(state: S) -> S:
        peak.see()
        return {"sq": state["item"] * state["item"]}

    def first(state: S) -> S:
        peak.see()
        return {"a": state["item"] + 1}

    def second(state: S) -> S:
        peak.see()
        return {"b": state["a"] * 2}

    app = make_app("scale-threads")
    one = app.pipeline("one", map_over("items", fn(tiny, writes=["sq"]), "out"))
    two = app.pipeline("two", map_over("items", fn(first) >> fn(second), "out"))
    caplog.set_level(logging.WARNING)
    db = database_url.rsplit("/", 1)[1]
    conns: list[int] = []
    done = threading.Event()

    def sample() -> None:  # the database's connections, all processes', while the map runs
        while not done.is_set():
            conns.append(int(sql(database_url, "SELECT count(*) FROM pg_stat_activity "
                                               "WHERE datname = %s", db)[0][0]) - 1)
            done.wait(0.1)

    with app:
        before = threading.active_count()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            n = 10_000
            result = one.run({"items": list(range(n))}, run_id="big-map")
            assert result.state["out"] == [i * i for i in range(n)]
        finally:
            done.set()
            sampler.join()
        result = two.run({"items": list(range(40))}, run_id="children-map")
        assert result.state["out"] == [{"a": i + 1, "b": (i + 1) * 2} for i in range(40)]
    assert bounds.limit() == 20  # DBOS's pool size
    # The bounded executor (20) plus DBOS's own threads; unbounded, 1,000 items held ~450
    # and 10,000 about 4,000.
    assert peak.most - before <= 45, (before, peak.most)
    # DBOS's pool (20) and the app's few own connections (events, executor lock, listener):
    # 23 at most when measured.
    assert conns and max(conns) <= 30, max(conns)
    timeouts = [r.getMessage() for r in caplog.records if "timeout" in r.getMessage().lower()]
    assert not timeouts, timeouts[:3]



def _inputs(url: str, run_id: str) -> list[str]:
    rows = sql(url, "SELECT inputs FROM dbos.workflow_input WHERE workflow_uuid LIKE %s",
               f"{run_id}/%")
    return [r[0] for r in rows]


def test_children_get_what_they_read_and_bytes_grow_linearly(
        make_app: Any, database_url: str) -> None:
    def first(state: S) -> S:
        return {"a": f"{state['item']}-{len(state['items'])}"}

    def second(state: S) -> S:
        return {"b": state["a"].upper()}

    def count(state: S) -> S:
        return {"size": len(state["doc"])}

    def shout(state: S) -> S:
        return {"loud": state["title"].upper()}

    app = make_app("scale-bytes")
    # Reads unknown (fn without reads=): each item refers to one snapshot of the state.
    unknown = app.pipeline("unknown", map_over("items", fn(first) >> fn(second), "out"))
    # Reads declared: each item gets just what it reads.
    known = app.pipeline("known", map_over(
        "items", fn(first, reads=["item", "items"]) >> fn(second, reads=["a"]), "out"))
    tasks = app.pipeline("tasks", dispatch(*[fn(count, name=f"count{i}") for i in range(8)],
                                           fn(shout, reads=["title"]),
                                           names=[f"t{i}" for i in range(9)]) >> join())
    pad = "x" * 300
    with app:
        sizes = {}
        for n in (20, 80):
            items = [f"{i}{pad}" for i in range(n)]
            out = unknown.run({"items": items}, run_id=f"u{n}").state["out"]
            assert [o["b"] for o in out] == [f"{i}{pad}-{n}".upper() for i in range(n)]
            sizes[n] = bytes_written(database_url, f"u{n}")
            assert all("durapipe:state_ref" in i for i in _inputs(database_url, f"u{n}"))
        # 4x the items: about 4x the bytes (copies of the state per item would be 16x).
        assert sizes[80] < 5 * sizes[20], sizes

        items = [f"{i}{pad}" for i in range(30)]
        out = known.run({"items": items, "doc": "y" * 100_000}, run_id="k").state["out"]
        assert [o["b"] for o in out] == [f"{i}{pad}-30".upper() for i in range(30)]
        assert all('"doc"' not in i and "durapipe:state_ref" not in i
                   for i in _inputs(database_url, "k"))

        doc = "z" * 1_000_000
        state = tasks.run({"doc": doc, "title": "hi"}, run_id="d").state
        assert state["size"] == len(doc) and state["loud"] == "HI"
        # The run's input and output and one snapshot: 3 MB; a copy per task was 12 MB.
        assert bytes_written(database_url, "d") < 3_500_000


MAP_SCRIPT = Path(__file__).parent / "scripts" / "map_crash.py"


def _item_label(function_name: str) -> str | None:
    """``0.0#7.1:b`` (step b of map item 7) -> ``7.b``; None for other rows."""
    path, _, label = function_name.partition(":")
    if "#" not in path:
        return None
    return f"{path.split('#')[1].split('.')[0]}.{label}"


@pytest.mark.slow
def test_sigkill_mid_map_with_large_state_recovers_each_item_once(
        database_url: str, tmp_path: Path) -> None:
    """Kill in the middle of a map whose items start from a state snapshot; recovery runs
    every item step not recorded, none recorded again, and the results are right."""
    after = {}
    for i in range(30):
        after[f"{i}.a"] = set()
        after[f"{i}.b"] = {f"{i}.a"}
    kill_then_recover(MAP_SCRIPT, database_url, tmp_path / "effects.log", 2, "m1:14.b", "m",
                      after, bounds.limit(), _item_label)
    # The items read the state from one snapshot per run, never from a copy of it.
    inputs = sql(database_url, "SELECT max(length(inputs)) FROM dbos.workflow_input "
                               "WHERE workflow_uuid LIKE 'm_/%'")
    assert inputs[0][0] < 1000
