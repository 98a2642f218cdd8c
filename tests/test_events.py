"""A run's event stream: order and completeness against the step rows, resuming at an
offset, async reading, token streaming, ask/stream, and streaming off."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google import genai
from google.genai import types

from dbutil import sql, wait_for
from durapipe import Agent, App, DurapipeError, Event, EventType, dispatch, fn, gate, join, map_over
from durapipe.models import FakeModel, GeminiModel
from durapipe.web.app import create_console
from fake_gemini import FakeGemini, Stream, text_reply

ENDS = (EventType.NODE_FINISHED, EventType.NODE_FAILED)


async def left(state: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0.2)
    return {"left": 1}


async def right(state: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0.2)
    return {"right": 1}


def prep(state: dict[str, Any]) -> dict[str, Any]:
    return {"items": [1, 2, 3]}


def double(state: dict[str, Any]) -> dict[str, Any]:
    return {"y": state["item"] * 2}


def full_pipeline() -> Any:
    return (fn(prep) >> (fn(left) | fn(right)) >> dispatch(Agent("bg"), names=["bg"], progress_key="bg_progress")
            >> gate("ok", "Ship?") >> map_over("items", fn(double), "doubled") >> join("bg")
            >> Agent("writer").writes("text"))


def approve_when_waiting(app: App, run_id: str) -> threading.Thread:
    def answer() -> None:
        wait_for(lambda: bool(app.pending(run_id)), what="the gate")
        app.approve(run_id, "ok", by="alice")
    t = threading.Thread(target=answer)
    t.start()
    return t


def check_history(events: list[Event]) -> None:
    """Offsets without gaps; each node started once, before it ended once; one run."""
    assert [e.offset for e in events] == list(range(len(events)))
    assert events[0].type is EventType.RUN_STARTED
    assert events[-1].type is EventType.RUN_FINISHED
    at_least_once = (EventType.TOKEN, EventType.RETRY, EventType.TASK_PROGRESS)
    keyed = Counter((e.type, e.path) for e in events if e.type not in at_least_once)
    assert all(n == 1 for n in keyed.values()), keyed
    started = {e.path: e.offset for e in events if e.type is EventType.NODE_STARTED}
    ended = {e.path: e.offset for e in events if e.type in ENDS}
    assert started.keys() == ended.keys()
    assert all(started[p] < ended[p] for p in started)


def test_stream_is_ordered_complete_and_resumable(
        make_app: Callable[..., App], database_url: str) -> None:
    app = make_app("events-app", model=FakeModel({"bg": "bg done", "writer": "the post"}))
    pipeline = app.pipeline("full", full_pipeline())
    with app:
        handle = pipeline.start({}, run_id="ev-1")
        t = approve_when_waiting(app, "ev-1")
        first: list[Event] = []
        for event in handle.stream(timeout=30):  # a reader that disconnects after 6 events
            first.append(event)
            if len(first) == 6:
                break
        rest = list(handle.stream(from_offset=first[-1].offset + 1, timeout=30))
        t.join()
        assert handle.result().state["text"] == "the post"
        events = list(app.get_run("ev-1").stream())  # after the end: the same history

        async def read_async() -> list[Event]:
            return [e async for e in handle.stream_async(from_offset=3)]
        tail = asyncio.run(read_async())
    assert first + rest == events and tail == events[3:]
    check_history(events)
    assert events[-1].data["status"] == "SUCCESS"
    types = [e.type for e in events]
    for kind in (EventType.TASK_DISPATCHED, EventType.TASK_JOINED, EventType.GATE_WAITING,
                 EventType.GATE_ANSWERED):
        assert types.count(kind) == 1, kind
    progress = [e for e in events if e.type is EventType.TASK_PROGRESS]
    assert progress and {(e.path, e.name) for e in progress} == {("0.2.0", "bg")}
    assert progress[-1].data["value"] == "bg done"  # the background agent's text, as it grew
    answered = next(e for e in events if e.type is EventType.GATE_ANSWERED)
    assert answered.data["by"] == "alice" and answered.data["status"] == "approved"
    at = {(e.type, e.path): e.offset for e in events}
    # the parallel branches interleave: both started before either finished
    assert max(at[EventType.NODE_STARTED, "0.1.0"], at[EventType.NODE_STARTED, "0.1.1"]) < min(
        at[EventType.NODE_FINISHED, "0.1.0"], at[EventType.NODE_FINISHED, "0.1.1"])
    # every map item is a node of its own
    assert {e.path for e in events if e.name == "double"} == {"0.4.0#0", "0.4.0#1", "0.4.0#2"}
    # every recorded step belongs to a node the stream shows start and finish
    rows = sql(database_url, "SELECT function_name FROM dbos.operation_outputs "
                             "WHERE function_name LIKE '0%:%'")
    finished = {e.path for e in events if e.type is EventType.NODE_FINISHED}
    assert rows and {name.split(":")[0] for (name,) in rows} <= finished


def test_tokens_stream_from_fakes_and_gemini_and_ask(make_app: Callable[..., App]) -> None:
    text = "durable tokens arrive one word at a time"
    server = FakeGemini().start()
    gemini = GeminiModel("gemini-2.5-flash", genai.Client(
        api_key="k", http_options=types.HttpOptions(base_url=server.url)))
    chunks_of = ["Hello ", "durable ", "world."]
    for _ in range(2):  # one streamed answer for ask(), one for stream()
        server.reply(Stream([text_reply(c, finish=None) for c in chunks_of[:-1]]
                            + [text_reply(chunks_of[-1])]))
    app = make_app("events-tokens")
    pipeline = app.pipeline("post", Agent("outline", FakeModel({"outline": "o"}))
                            .instruct("{prompt}").writes("outline")
                            >> Agent("writer", FakeModel({"writer": text})).instruct("{outline}")
                            .writes("post").stream_tokens()
                            >> Agent("polish", gemini).instruct("{post}").writes("final")
                            .stream_tokens())
    try:
        with app:
            assert pipeline.ask("Write about durability") == "Hello durable world."
            chunks = list(pipeline.stream("Write about durability", run_id="ev-3"))
            events = list(app.get_run("ev-3").stream())
            with TestClient(create_console(app)) as console:  # the run page's live updates
                res = console.get("/runs/ev-3/events", headers={"Last-Event-ID": "1"})
                assert console.get("/runs/nope/events").status_code == 404
    finally:
        server.stop()
    assert "".join(chunks) == text + "Hello durable world."
    tokens = [e for e in events if e.type is EventType.TOKEN]
    assert "".join(e.data["text"] for e in tokens if e.name == "writer") == text
    assert [e.data["text"] for e in tokens if e.name == "polish"] == chunks_of  # as Gemini sent
    assert {e.name for e in tokens} == {"writer", "polish"}  # outline does not stream
    started = next(e for e in events if e.type is EventType.MODEL_STARTED)
    finished = next(e for e in events if e.type is EventType.NODE_FINISHED and e.name == "writer")
    assert started.offset < tokens[0].offset < tokens[len(text.split()) - 1].offset < finished.offset
    check_history(events)
    ids = [int(line[4:]) for line in res.text.splitlines() if line.startswith("id: ")]
    assert ids == [e.offset for e in events[2:] if e.type is not EventType.TOKEN]


def test_streaming_off_writes_nothing(make_app: Callable[..., App], database_url: str) -> None:
    app = make_app("events-off", events=False, model=FakeModel({"writer": "w"}))
    pipeline = app.pipeline("p", fn(prep) >> Agent("writer"))
    with app:
        assert pipeline.ask("hi") == "w"
    assert sql(database_url, "SELECT to_regclass('durapipe.events')") == [(None,)]


def test_sqlite_stream_and_clear_errors(tmp_path: Any) -> None:
    app = App("events-lite", f"sqlite:///{tmp_path}/lite.sqlite")
    agentless = app.pipeline("plain", fn(prep))
    pipeline = app.pipeline("p", Agent("writer", FakeModel({"writer": "hi there"}))
                            .instruct("{prompt}").stream_tokens())
    with app:
        assert "".join(pipeline.stream("x", run_id="lite-1")) == "hi there"
        events = list(app.get_run("lite-1").stream())
        check_history(events)
        assert list(app.get_run("lite-1").stream(from_offset=len(events) - 1)) == events[-1:]
        with pytest.raises(DurapipeError, match="from_offset=-1 must be an int >= 0"):
            list(app.get_run("lite-1").stream(from_offset=-1))
        with pytest.raises(DurapipeError, match="the prompt must be a string"):
            pipeline.ask(42)  # type: ignore[arg-type]
        with pytest.raises(DurapipeError, match="has no Agent"):
            agentless.ask("x")


def test_a_resumed_run_streams_on_past_its_first_end(make_app: Callable[..., App],
                                                     database_url: str) -> None:
    from durapipe.engine.admin import Admin

    app = make_app("events-resume")
    pipeline = app.pipeline("p", fn(prep) >> gate("ok", "Ship?"))
    with app:
        handle = pipeline.start({}, run_id="ev-r")
        wait_for(lambda: bool(app.pending("ev-r")), what="the gate")
        handle.cancel()
        with Admin(database_url) as admin:
            admin.resume("ev-r")
        t = approve_when_waiting(app, "ev-r")
        events = list(handle.stream(timeout=30))  # from 0, across the first end
        t.join()
        assert app.get_run("ev-r").result(timeout=30).run_id == "ev-r"
    types = [e.type for e in events]
    assert types.count(EventType.RUN_RESUMED) == 1
    assert events[-1].type is EventType.RUN_FINISHED and events[-1].data["status"] == "SUCCESS"
    assert types.index(EventType.RUN_RESUMED) < types.index(EventType.GATE_ANSWERED)
    assert [e.offset for e in events] == list(range(len(events)))
