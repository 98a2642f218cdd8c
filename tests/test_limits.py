"""Concurrency limits across runs and worker processes, adaptive limits, and their audit."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dbutil import kill_then_recover, lines, most_at_once, spawn, sql, wait_for
from durapipe import Agent, App, BuildError, DurapipeError, ModelError, fn, limit
from durapipe.models.fake import FunctionModel
from fake_gemini import Error, FakeGemini, text_reply

SCRIPTS = Path(__file__).parent / "scripts"
WORKER = SCRIPTS / "limit_worker.py"


@pytest.mark.slow
def test_a_limit_of_two_holds_across_two_worker_processes(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "steps.log"
    procs = [spawn(WORKER, database_url, str(log), f"w{i}", "run", f"p{i}-", "6") for i in (1, 2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "ALL DONE" in out, out
    rows = [line.split() for line in lines(log)]
    assert len(rows) == 12 and len({r[0] for r in rows}) == 2  # both processes ran steps
    intervals = [(float(r[1]), float(r[2])) for r in rows]
    by_pid = {pid: [iv for r, iv in zip(rows, intervals, strict=True) if r[0] == pid]
              for pid in {r[0] for r in rows}}
    first, second = ((min(s for s, _ in v), max(e for _, e in v)) for v in by_pid.values())
    assert first[0] < second[1] and second[0] < first[1]  # the two workers ran at once
    # Each step logs the span it ran in; the limit of 2 is never exceeded, and is used.
    assert most_at_once(intervals) == 2
    assert sql(database_url, "SELECT concurrency, current_limit, in_use FROM durapipe.limit_status "
                             "WHERE app = 'limit-app' AND key = 'shared'") == [(2, 2, 0)]


@pytest.mark.slow
def test_a_killed_holder_frees_its_slot_when_its_lease_runs_out(database_url: str,
                                                                tmp_path: Path) -> None:
    """A SIGKILLed process whose run nobody recovers holds its slot only until its lease
    (here 1 s) runs out; a worker of another executor then takes it."""
    log = tmp_path / "steps.log"
    os.environ["DURAPIPE_LIMIT_LEASE"] = "1"
    try:
        holder = spawn(WORKER, database_url, str(log), "w1", "hold")
        wait_for(lambda: "holding" in lines(log), 60, "the holder to take the slot")
        assert sql(database_url, "SELECT in_use FROM durapipe.limit_status WHERE key = 'solo'") == [(1,)]
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        killed = time.time()
        other = spawn(WORKER, database_url, str(log), "w2", "solo", "after")
        out, _ = other.communicate(timeout=60)
    finally:
        del os.environ["DURAPIPE_LIMIT_LEASE"]
    assert other.returncode == 0 and "ALL DONE" in out, out
    done = [float(line.split()[1]) for line in lines(log) if line.startswith("solo ")]
    assert len(done) == 1 and done[0] > killed
    # The dead run still is PENDING, but its slot no longer counts.
    assert sql(database_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'held'") \
        == [("PENDING",)]


@pytest.mark.slow
def test_sigkill_inside_a_limited_part_then_recover_runs_each_step_once(
        database_url: str, tmp_path: Path) -> None:
    """The killed run takes its own slot back on recovery; recorded steps never run again,
    and every slot is released at the end."""
    after = {"a": set(), "b": {"a"}, "c": {"b"}, "d": {"c"}}
    kill_then_recover(SCRIPTS / "limit_crash.py", database_url, tmp_path / "effects.log", 4,
                      "k1:c", "k", after, 1)
    assert sql(database_url, "SELECT count(*) FROM durapipe.limit_slots "
                             "WHERE released_at IS NULL") == [(0,)]
    assert sql(database_url, "SELECT count(*) FROM durapipe.limit_slots") == [(4,)]


class Provider:
    """A fake model provider that answers 429 while more than ``threshold`` requests are
    in flight; counts what it answered."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.in_flight = 0
        self.most = 0
        self.refused = 0
        self.answered = 0

    async def __call__(self, request: Any) -> str:
        self.in_flight += 1
        try:
            self.most = max(self.most, self.in_flight)
            await asyncio.sleep(0.05)
            if self.in_flight > self.threshold:
                self.refused += 1
                raise ModelError("429 RESOURCE_EXHAUSTED", status_code=429)
            self.answered += 1
            return "ok"
        finally:
            self.in_flight -= 1


def _start_all(pipe: Any, prefix: str, n: int) -> tuple[int, int]:
    handles = pipe.start_many([{"topic": str(i)} for i in range(n)],
                              run_ids=[f"{prefix}{i}" for i in range(n)])
    ok = failed = 0
    for h in handles:
        try:
            h.result(timeout=60)
            ok += 1
        except DurapipeError:
            failed += 1
    return ok, failed


def test_an_adaptive_limit_shrinks_under_429_and_grows_back(
        make_app: Callable[..., App], database_url: str) -> None:
    provider = Provider(threshold=2)
    agent = Agent("writer", model=FunctionModel(provider)).instruct("{topic}").writes("text")
    app = make_app("adaptive-app")
    pipe = app.pipeline("p", limit("llm", agent, concurrency=6, adaptive=True))
    with app:
        ok, failed = _start_all(pipe, "a", 24)
        shrunk = app.limits()[0]
        assert failed > 0 and provider.refused == failed  # 429s happened above 2 in flight
        assert shrunk["limit"] < 6
        down = [c for c in app.limit_changes("llm") if c["new_limit"] < c["old_limit"]]
        assert down and all("429" in c["reason"] for c in down)
        assert all(c["new_limit"] == max(1, c["old_limit"] // 2) for c in down)
        # The provider recovers: successes raise the limit by one per window, up to 6.
        provider.threshold = 100
        refused = provider.refused
        ok, failed = _start_all(pipe, "b", 30)
        assert (ok, failed) == (30, 0) and provider.refused == refused
        assert app.limits() == [{"key": "llm", "concurrency": 6, "adaptive": True, "limit": 6,
                                 "in_use": 0}]
        changes = app.limit_changes("llm")
        ups = [c for c in changes if c["new_limit"] > c["old_limit"]]
        assert [c["new_limit"] for c in ups][-1] == 6
        assert all(c["new_limit"] == c["old_limit"] + 1 for c in ups)
        assert provider.most <= 6
    audit = sql(database_url, "SELECT current_limit, changes FROM durapipe.limit_status "
                              "WHERE app = 'adaptive-app' AND key = 'llm'")
    assert audit == [(6, len(changes))]
    # The audit trail itself: the halvings under 429s, then the steps back up to 6.
    trail = sql(database_url, "SELECT old_limit, new_limit, reason FROM durapipe.limit_changes "
                              "WHERE app = 'adaptive-app' AND key = 'llm' ORDER BY id")
    assert [(o, n) for o, n, _ in trail] == [(c["old_limit"], c["new_limit"]) for c in changes]
    assert trail[0][1] < trail[0][0] and "429" in trail[0][2] and trail[-1][1] == 6


def test_a_limit_on_sqlite_holds_within_the_process(tmp_path: Path) -> None:
    spans: list[tuple[float, float]] = []

    async def work(state: dict[str, Any]) -> dict[str, Any]:
        start = time.time()
        await asyncio.sleep(0.05)
        spans.append((start, time.time()))
        return {"done": True}

    app = App("sqlite-limits", f"sqlite:///{tmp_path}/limits.sqlite")
    pipe = app.pipeline("p", fn(work).concurrency(2))
    with app:
        handles = pipe.start_many([{}] * 6)
        for h in handles:
            h.result(timeout=60)
        assert app.limits() == [{"key": "work", "concurrency": 2, "adaptive": False, "limit": 2,
                                 "in_use": 0}]
    assert len(spans) == 6 and most_at_once(spans) == 2


def test_limits_are_checked_when_built_and_registered(make_app: Callable[..., App]) -> None:
    step = fn(lambda s: None, name="step")
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(BuildError, match="concurrency must be a whole number"):
            limit("k", step, concurrency=bad)  # type: ignore[arg-type]
    with pytest.raises(BuildError, match="the key must be"):
        limit("", step, concurrency=1)
    with pytest.raises(BuildError, match="adaptive must be True or False"):
        step.concurrency(2, adaptive="yes")  # type: ignore[arg-type]
    app = make_app()
    app.pipeline("one", limit("k", step, concurrency=2))
    with pytest.raises(BuildError, match=r"limit key 'k' is already declared with concurrency=2"):
        app.pipeline("two", limit("k", step, concurrency=3))
    assert "two" not in app.pipelines


def test_a_model_clients_own_retries_of_429_lower_an_adaptive_limit(
        make_app: Callable[..., App]) -> None:
    """GeminiModel retries a 429 inside one step; the limit around it still sees it."""
    from google import genai
    from google.genai import types

    from durapipe.models import GeminiModel

    server = FakeGemini().start()
    try:
        server.reply(Error(429, "RESOURCE_EXHAUSTED"), text_reply("ok"), text_reply("ok"),
                     text_reply("ok"))
        client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=server.url))
        model = GeminiModel("gemini-2.5-flash", client, initial_delay=0.01)
        app = make_app("gemini-limits")
        writer = Agent("writer", model).instruct("{topic}").writes("text")
        pipe = app.pipeline("p", writer.concurrency(4, adaptive=True))
        with app:
            assert pipe.run({"topic": "a"}).state["text"] == "ok"  # retried, then answered
            [down] = app.limit_changes("writer")
            assert (down["old_limit"], down["new_limit"]) == (4, 2) and "429" in down["reason"]
            pipe.run({"topic": "b"})
            pipe.run({"topic": "c"})  # two successes at 2: one slot more
            assert [c["new_limit"] for c in app.limit_changes("writer")] == [2, 3]
    finally:
        server.stop()


def test_limit_reads_as_a_wrapper_or_around_a_node() -> None:
    step = fn(lambda s: None, name="step")
    expected = limit("k", step, concurrency=2)
    assert limit("k", concurrency=2)(step) == limit("k", 2)(step) == expected
    assert step.concurrency(2) == limit("step", step, concurrency=2)
    with pytest.raises(BuildError, match=r"wraps a node rather than being one: apply it"):
        _ = step >> limit("k", concurrency=2)


def test_sync_function_steps_in_a_sequence_report_to_an_adaptive_limit(
        make_app: Callable[..., App]) -> None:
    """Back-to-back sync fns run on one worker thread; each still reports its outcome."""
    calls = {"n": 0}

    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("provider timed out")
        return {"ok": True}

    def after(state: dict[str, Any]) -> None:
        return None

    app = make_app("sync-adaptive")
    pipe = app.pipeline("p", limit("api", fn(flaky, retries=1) >> fn(after), concurrency=8,
                                   adaptive=True))
    with app:
        pipe.run({})
        changes = app.limit_changes("api")
    assert [(c["old_limit"], c["new_limit"]) for c in changes] == [(8, 4)]
    assert "provider timed out" in changes[0]["reason"]
