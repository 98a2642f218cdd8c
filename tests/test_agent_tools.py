"""Agents with tools and structured output: the loop, its bounds, its errors, and a crash."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from dbutil import lines, spawn, sql, wait_for
from durapipe import Agent, App, BuildError, ModelError, NodeFailed, fn
from durapipe.models import FakeModel, FunctionModel, ModelRequest, ToolCall
from fake_gemini import HOLD, FakeGemini, calls_reply, text_reply

HERE = Path(__file__).parent


class Review(pydantic.BaseModel):
    title: str
    score: int


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


async def shout(text: str, times: int = 1) -> str:
    """Upper-case a text."""
    return text.upper() * times


def test_tool_loop_with_sync_and_async_tools(database_url: str) -> None:
    model = FakeModel({"calc": [[ToolCall("add", {"a": 2, "b": "3"}), ToolCall("shout", {"text": "hi"})],
                                "done"]})
    app = App("tools-app", database_url, model=model)
    p = app.pipeline("p", Agent("calc").instruct("Add {x}").tools(add, shout).writes("out"))
    with app:
        assert p.run({"x": 1}, run_id="loop-1").state["out"] == "done"
    second = model.calls[1]
    assert second.messages[0]["tool_calls"][0]["name"] == "add"
    assert second.messages[1] == {"role": "tool", "results": [
        {"name": "add", "id": None, "response": {"result": 5}},  # "3" coerced by the schema
        {"name": "shout", "id": None, "response": {"result": "HI"}}]}
    assert [t.name for t in second.tools] == ["add", "shout"]
    names = [r[0] for r in sql(database_url, "SELECT function_name FROM dbos.operation_outputs "
                                             "WHERE workflow_uuid = %s ORDER BY function_id", "loop-1")]
    assert names == ["0:calc", "0:calc#tool0.0:add", "0:calc#tool0.1:shout", "0:calc#model1"]


def test_bad_arguments_and_unknown_tools_go_back_to_the_model(database_url: str) -> None:
    def script(req: ModelRequest) -> Any:
        if not req.messages:
            return [ToolCall("add", {"a": "x"}), ToolCall("nope", {})]
        return str(req.messages[-1]["results"])

    app = App("tools-app", database_url, model=FunctionModel(script))
    p = app.pipeline("p", Agent("calc").instruct("go").tools(add))
    with app:
        out = p.run({}).state["calc"]
    assert "invalid arguments for add: a: Input should be a valid integer" in out
    assert "b: Field required" in out
    assert "there is no tool named 'nope'; tools: ['add']" in out


def test_turn_bound_fails_with_model_error(database_url: str) -> None:
    model = FakeModel({"loop": ToolCall("add", {"a": 1, "b": 1})})
    app = App("tools-app", database_url, model=model)
    p = app.pipeline("p", Agent("loop").instruct("go").tools(add).max_turns(3))
    with app, pytest.raises(ModelError, match=r"0:loop: no final answer after 3 model turns.*max_turns"):
        p.run({})
    assert len(model.calls) == 3


def test_failing_tool_fails_the_node(database_url: str) -> None:
    def broken(x: int) -> int:
        raise ValueError("tool exploded")

    model = FakeModel({"a": [ToolCall("broken", {"x": 1}), "never"]})
    app = App("tools-app", database_url, model=model)
    p = app.pipeline("p", Agent("a").instruct("go").tools(broken))
    with app, pytest.raises(NodeFailed, match=r"0:a#tool0.0:broken failed: ValueError: tool exploded"):
        p.run({})


def test_structured_output_with_fakes_and_invalid_answers(database_url: str) -> None:
    model = FakeModel({"ok": Review(title="T", score=5), "bad": ["nope", {"title": 1}, "{}"]})
    app = App("tools-app", database_url, model=model)
    p = app.pipeline("p", Agent("ok").output(Review).writes("r") >> fn(lambda s: {"s": s["r"]["score"]}))
    q = app.pipeline("q", Agent("bad").output(Review))
    with app:
        assert p.run({}).state == {"r": {"title": "T", "score": 5}, "s": 5}
        with pytest.raises(ModelError, match=r"does not match Review after 3 tries: .*score: Field required") as info:
            q.run({})
    assert "title: Field required" in info.value.errors
    bad_calls = [c for c in model.calls if c.agent == "bad"]
    assert bad_calls[0].output_schema == Review.model_json_schema()
    assert "Invalid JSON" in bad_calls[1].messages[-1]["text"]


def test_tool_signatures_are_checked_when_built() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    def star(*args: int) -> int:
        return 0

    with pytest.raises(BuildError, match="parameter 'x' has no type annotation"):
        Agent("a").tools(untyped)
    with pytest.raises(BuildError, match="parameter 'args' is variadic positional"):
        Agent("a").tools(star)
    with pytest.raises(BuildError, match="two tools are named 'add'"):
        Agent("a").tools(add, add)
    with pytest.raises(BuildError, match="max_turns"):
        Agent("a").max_turns(0)


def test_fake_model_streams_word_snapshots() -> None:
    import asyncio

    async def collect() -> list[str]:
        return [s.text async for s in FakeModel({"a": "one two three"}).stream(
            ModelRequest(agent="a", prompt="p"))]

    assert asyncio.run(collect()) == ["one ", "one two ", "one two three"]


@pytest.fixture
def server() -> Iterator[FakeGemini]:
    srv = FakeGemini().start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_crash_in_tool_loop_repeats_no_finished_request_or_tool(
    server: FakeGemini, database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "tools.log"
    script = HERE / "gemini_crash_app.py"
    server.reply(calls_reply(("weather", {"city": "Oslo"})),
                 calls_reply(("to_fahrenheit", {"celsius": 20.0})),
                 HOLD,  # the third request (after both tool calls) never answers: kill here
                 text_reply("Oslo: 68 F"))
    first = spawn(script, database_url, server.url, str(log), "start")
    try:
        wait_for(lambda: len(server.requests) == 3, what="the third model request")
        first.kill()
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    server.release()
    assert lines(log) == ["weather Oslo", "to_fahrenheit 20.0"]

    second = spawn(script, database_url, server.url, str(log), "recover")
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out
    assert "ANSWER Oslo: 68 F" in out
    assert lines(log) == ["weather Oslo", "to_fahrenheit 20.0"]  # no tool ran twice
    assert len(server.requests) == 4  # turns 0 and 1 were not asked again
    assert server.requests[3].contents == server.requests[2].contents
    assert len(server.requests[3].contents) == 5
    rows = sql(database_url, """
        SELECT count(*), sum((output::jsonb->>'input_tokens')::int),
               sum((output::jsonb->>'latency_ms')::float) > 0
        FROM dbos.operation_outputs WHERE workflow_uuid = %s AND output::jsonb ? 'input_tokens'
    """, "crash-run")
    assert rows == [(3, 20 + 20 + 11, True)]
