"""GeminiModel through the real google-genai client, against a fake Gemini server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
from google import genai
from google.genai import types

from dbutil import sql
from durapipe import Agent, App, ModelError
from durapipe.engine import agent as agent_engine
from durapipe.models import FakeModel, GeminiModel, ModelRequest, ModelResponse, default_model, resolve_model
from fake_gemini import Delay, Error, FakeGemini, Stream, calls_reply, text_reply

KEY = "sk-test-SECRET-7f3a"


@pytest.fixture
def server() -> Iterator[FakeGemini]:
    srv = FakeGemini().start()
    yield srv
    srv.stop()


def gemini(server: FakeGemini, **kwargs: Any) -> GeminiModel:
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=server.url))
    kwargs.setdefault("initial_delay", 0.01)
    return GeminiModel("gemini-2.5-flash", client, **kwargs)


def weather(city: str) -> dict[str, Any]:
    """Current weather in a city."""
    return {"city": city, "celsius": 21.5}


async def to_fahrenheit(celsius: float) -> float:
    """Convert Celsius to Fahrenheit."""
    return round(celsius * 9 / 5 + 32, 1)


class Review(pydantic.BaseModel):
    title: str
    score: int


def test_plain_call_records_usage_and_never_the_key(server: FakeGemini, database_url: str) -> None:
    server.reply(text_reply("Durable pipelines keep going.", prompt_tokens=12, output_tokens=5))
    app = App("gemini-app", database_url)
    p = app.pipeline("p", Agent("writer", gemini(server)).instruct("Write about {topic}.").writes("draft"))
    with app:
        result = p.run({"topic": "DBOS"}, run_id="plain-1")
    assert result.state["draft"] == "Durable pipelines keep going."
    [req] = server.requests
    assert (req.model, req.method) == ("gemini-2.5-flash", "generateContent")
    assert req.contents == [{"role": "user", "parts": [{"text": "Write about DBOS."}]}]
    assert req.headers.get("x-goog-api-key") == KEY  # sent to the server, stored nowhere
    rows = sql(database_url, "SELECT function_name, output FROM dbos.operation_outputs "
                             "WHERE workflow_uuid = %s", "plain-1")
    assert [r[0] for r in rows] == ["0:writer"]
    dump = sql(database_url, "SELECT string_agg(t::text, ' ') FROM ("
               "SELECT o::text AS t FROM dbos.operation_outputs o UNION ALL "
               "SELECT w::text FROM dbos.workflow_status w) x")[0][0]
    assert KEY not in dump
    usage = sql(database_url, """
        SELECT sum((output::jsonb->>'input_tokens')::int), sum((output::jsonb->>'output_tokens')::int),
               max(output::jsonb->>'model'), max(output::jsonb->>'finish_reason'),
               bool_and((output::jsonb->>'latency_ms')::float > 0)
        FROM dbos.operation_outputs WHERE workflow_uuid = %s AND output::jsonb ? 'input_tokens'
    """, "plain-1")
    assert usage == [(12, 5, "gemini-2.5-flash", "stop", True)]


def test_two_tool_loop_sends_declarations_and_results(server: FakeGemini, database_url: str) -> None:
    server.reply(calls_reply(("weather", {"city": "Paris"})),
                 calls_reply(("to_fahrenheit", {"celsius": 21.5})),
                 text_reply("Paris: 70.7 F"))
    app = App("gemini-app", database_url)
    agent = (Agent("assistant", gemini(server)).instruct("Weather in {city} in F?")
             .tools(weather, to_fahrenheit).writes("answer"))
    p = app.pipeline("p", agent)
    with app:
        assert p.run({"city": "Paris"}, run_id="tools-1").state["answer"] == "Paris: 70.7 F"
    first, second, third = server.requests
    decls = first.body["tools"][0]["functionDeclarations"]
    assert [d["name"] for d in decls] == ["weather", "to_fahrenheit"]
    assert decls[0]["description"] == "Current weather in a city."
    # proto JSON takes either spelling; this SDK version sends the snake_case one
    params = decls[0].get("parametersJsonSchema", decls[0].get("parameters_json_schema"))
    assert params == {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    assert second.contents[1]["parts"][0]["functionCall"] == {"name": "weather", "args": {"city": "Paris"}}
    assert second.contents[2]["parts"][0]["functionResponse"] == {
        "name": "weather", "response": {"result": {"city": "Paris", "celsius": 21.5}}}
    assert third.contents[4]["parts"][0]["functionResponse"]["response"] == {"result": 70.7}
    names = [r[0] for r in sql(database_url, "SELECT function_name FROM dbos.operation_outputs "
                                             "WHERE workflow_uuid = %s ORDER BY function_id", "tools-1")]
    assert names == ["0:assistant", "0:assistant#tool0.0:weather", "0:assistant#model1",
                     "0:assistant#tool1.0:to_fahrenheit", "0:assistant#model2"]


def test_structured_output_asks_schema_and_retries_invalid(server: FakeGemini, database_url: str) -> None:
    server.reply(text_reply('{"title": "Good"}'), text_reply('{"title": "Good", "score": 4}'))
    app = App("gemini-app", database_url)
    p = app.pipeline("p", Agent("critic", gemini(server)).instruct("Review {x}.").output(Review)
                     .writes("review"))
    with app:
        assert p.run({"x": "it"}).state["review"] == {"title": "Good", "score": 4}
    first, second = server.requests
    config = first.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    schema = config.get("responseJsonSchema", config.get("response_json_schema"))
    assert schema == Review.model_json_schema()
    feedback = second.contents[-1]["parts"][0]["text"]
    assert "score: Field required" in feedback


def test_429_is_retried_then_succeeds(server: FakeGemini) -> None:
    server.reply(Error(429, "RESOURCE_EXHAUSTED"), Error(503, "UNAVAILABLE"), text_reply("ok"))
    response = asyncio.run(gemini(server).generate(ModelRequest(agent="a", prompt="hi")))
    assert response.text == "ok"
    assert len(server.requests) == 3


def test_timeout_is_retried(server: FakeGemini) -> None:
    server.reply(Delay(1.0, text_reply("late")), text_reply("on time"))
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=server.url, timeout=300))
    model = GeminiModel("gemini-2.5-flash", client, initial_delay=0.01)
    assert asyncio.run(model.generate(ModelRequest(agent="a", prompt="hi"))).text == "on time"
    assert len(server.requests) == 2


def test_5xx_gives_up_after_max_attempts(server: FakeGemini) -> None:
    server.reply(*[Error(500, "INTERNAL")] * 3)
    with pytest.raises(ModelError, match="failed 3 times .*HTTP 500"):
        asyncio.run(gemini(server, max_attempts=3).generate(ModelRequest(agent="a", prompt="hi")))
    assert len(server.requests) == 3


def test_400_fails_at_once_even_with_step_retries(server: FakeGemini, database_url: str) -> None:
    server.reply(Error(400, "INVALID_ARGUMENT", "Invalid JSON payload"), text_reply("never"))
    app = App("gemini-app", database_url)
    p = app.pipeline("p", Agent("writer", gemini(server)).instruct("x").retries(3))
    with app, pytest.raises(ModelError, match="HTTP 400 INVALID_ARGUMENT: Invalid JSON payload"
                                             ".*not retried") as info:
        p.run({})
    assert info.value.status_code == 400
    assert len(server.requests) == 1


def test_streamed_answer(server: FakeGemini) -> None:
    server.reply(Stream([text_reply("Hello ", finish=None), text_reply("durable ", finish=None),
                         text_reply("world.", output_tokens=9)]))

    async def collect() -> list[ModelResponse]:
        return [s async for s in gemini(server).stream(ModelRequest(agent="a", prompt="hi"))]

    snapshots = asyncio.run(collect())
    assert [s.text for s in snapshots] == ["Hello ", "Hello durable ", "Hello durable world."]
    assert snapshots[-1].finish_reason == "stop" and snapshots[-1].output_tokens == 9
    assert server.requests[0].method == "streamGenerateContent"


def test_agent_publishes_partial_text_when_a_progress_channel_is_set(
    server: FakeGemini, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextvars import ContextVar

    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(agent_engine, "_partial_sink",
                        ContextVar("sink", default=lambda where, text: seen.append((where, text))))
    server.reply(Stream([text_reply("Part one, ", finish=None), text_reply("part two.")]))
    app = App("gemini-app", database_url)
    p = app.pipeline("p", Agent("writer", gemini(server)).instruct("x").writes("draft"))
    with app:
        assert p.run({}).state["draft"] == "Part one, part two."
    assert seen == [("0:writer", "Part one, "), ("0:writer", "Part one, part two.")]


def test_guard_blocks_real_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    real = GeminiModel("gemini-2.5-flash", genai.Client(api_key="x"))
    with pytest.raises(ModelError, match="real model requests are blocked"):
        real.client  # noqa: B018
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_GENAI_USE_VERTEXAI", raising=False)
    model = resolve_model("gemini-2.5-flash", "writer")
    assert isinstance(model, GeminiModel) and model.name == "gemini-2.5-flash"
    with pytest.raises(ModelError, match="no Gemini API key; set GEMINI_API_KEY"):
        model.client  # noqa: B018
    with pytest.raises(ModelError, match="no model client is known for 'gpt-4'"):
        resolve_model("gpt-4", "writer")


def test_default_model_says_which(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeModel({"writer": "x"})
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_GENAI_USE_VERTEXAI", raising=False)
    assert default_model(fake) == (fake, "model: offline FakeModel (set GEMINI_API_KEY to use Gemini)")
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    assert default_model(fake)[0] is fake  # real calls are blocked under pytest
    monkeypatch.setenv("DURAPIPE_BLOCK_REAL_MODELS", "0")
    model, label = default_model(fake)
    assert isinstance(model, GeminiModel) and "Gemini gemini-2.5-flash" in label

