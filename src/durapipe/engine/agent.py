"""The Agent handler: model turns and tool calls, each its own DBOS step.

An agent loops: ask the model; when it asks for tool calls, run them and ask again with
the results; stop at a final answer, or fail with :class:`ModelError` past the turn limit.
Steps are named from the node path, so a restarted run finds every finished model request
and tool call recorded and carries on after the last one:

- ``<path>:<agent>`` the first model request, ``<path>:<agent>#model<turn>`` later ones;
- ``<path>:<agent>#tool<turn>.<i>:<tool>`` the i-th tool call the model asked for in a turn.

The tool calls of one turn run concurrently; their steps start in the order the model
listed them, so step numbers are the same on every replay. With ``.output(PydanticModel)``
the final answer is validated; an invalid one is sent back to the model with the errors
(up to ``OUTPUT_RETRIES`` times) before the node fails.

A model step records ``text, model, finish_reason, input_tokens, output_tokens,
tool_calls, latency_ms, agent, turn`` as JSON; the client (and its API key) is looked up
inside the step and never recorded.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import pydantic

from ..errors import ModelError
from ..ir import Agent
from ..models import ModelRequest, ModelResponse, StreamingModel, ToolCall, resolve_model
from ..models.tools import Tool, make_tools
from ..state import State, check_updates, render
from . import bounds, budget, events
from .context import RunContext, node_error, run_step

OUTPUT_RETRIES = 2

# -- progress hook ------------------------------------------------------------------------

PartialSink = Callable[[str, str], Awaitable[None] | None]
_partial_sink: ContextVar[PartialSink | None] = ContextVar("durapipe_partial_sink", default=None)


def set_partial_sink(sink: PartialSink | None) -> Any:
    """Route partial model text of agents run in this context to ``sink(where, text)``.

    The dispatch engine sets this inside a background task that has a ``progress_key``;
    returns the ContextVar token for ``reset_partial_sink``.
    """
    return _partial_sink.set(sink)


def reset_partial_sink(token: Any) -> None:
    _partial_sink.reset(token)


async def _publish_partial(where: str, text: str) -> None:
    """Hook: publish the text an agent has streamed so far. A no-op without a progress channel.

    ``where`` is the model step name (``<path>:<agent>[#model<turn>]``), ``text`` the whole
    answer so far (not a delta). Called inside the model step.
    """
    sink = _partial_sink.get()
    if sink is None:
        return
    out = sink(where, text)
    if inspect.isawaitable(out):
        await out


# -- steps --------------------------------------------------------------------------------

async def _call_model(model_ref: Any, request: ModelRequest, where: str, turn: int,
                      tokens: bool = False) -> dict[str, Any]:
    model = resolve_model(model_ref, request.agent)  # looked up inside the step
    started = time.perf_counter()
    response: ModelResponse | None = None
    tokens = tokens and events.active() is not None
    if (tokens or _partial_sink.get() is not None) and isinstance(model, StreamingModel):
        path, _, name = where.partition(":")
        if tokens:  # a second run of this call (crash, retry) is marked model_restarted
            events.emit("model_started", path=path, name=name, kind="model",
                        key=f"model:{where}", on_repeat="model_restarted",
                        data={"agent": request.agent, "turn": turn})
        sent = 0
        async for snapshot in model.stream(request):
            response = snapshot
            if tokens and len(snapshot.text) > sent:
                events.emit("token", path=path, name=name, kind="model",
                            data={"text": snapshot.text[sent:], "agent": request.agent})
                sent = len(snapshot.text)
            await _publish_partial(where, snapshot.text)
        if response is None:
            raise ModelError(f"agent {where}: the model streamed no answer", node=where)
    else:
        response = await model.generate(request)
    if not isinstance(response, ModelResponse):
        raise ModelError(f"agent {where}: the model returned {type(response).__name__}, "
                         "not a ModelResponse", node=where)
    record = response.to_json()
    record["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
    record["agent"] = request.agent
    record["turn"] = turn
    return record


async def _call_tool(tool: Tool | None, call: ToolCall, where: str,
                     available: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": call.name, "id": call.id}
    if tool is None:
        out["response"] = {"error": f"there is no tool named {call.name!r}; tools: {available}"}
        return out
    try:
        args = tool.bind(call.args)
    except pydantic.ValidationError as exc:
        # The model can correct bad arguments: tell it, as the tool's answer.
        out["response"] = {"error": f"invalid arguments for {call.name}: {_errors_text(exc)}"}
        return out
    if tool.is_async:
        result = await tool.func(**args)
    else:
        result = await bounds.to_thread(functools.partial(tool.func, **args))
    out["response"] = {"result": check_updates({"result": result}, where)["result"]}
    return out


def _errors_text(exc: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
    )


async def _run_tools(calls: tuple[ToolCall, ...], tools: dict[str, Tool], where: str,
                     turn: int) -> list[dict[str, Any]]:
    available = sorted(tools)
    steps = []
    for i, call in enumerate(calls):
        step = f"{where}#tool{turn}.{i}:{call.name}"

        async def body(call: ToolCall = call, step: str = step) -> dict[str, Any]:
            return await _call_tool(tools.get(call.name), call, step, available)

        steps.append(run_step(step, 0, body))
    # gather starts each coroutine in list order, and each starts its step before it first
    # suspends: step numbers follow the model's order of calls, whatever finishes first.
    results = await asyncio.gather(*steps, return_exceptions=True)
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            raise node_error(r, f"{where}#tool{turn}.{i}:{calls[i].name}") from r
    return [r for r in results if isinstance(r, dict)]


# -- the handler --------------------------------------------------------------------------

async def run_agent(ctx: RunContext, node: Agent, path: str, state: State) -> State:
    where = f"{path}:{node.label}"
    prompt = render(node.instruction or "", state, f"agent {where}")
    app_model = ctx.app.model
    model_ref = app_model if app_model is not None else node.model_ref
    tools = {t.name: t for t in make_tools(node.tool_fns, node.name)}
    output_model = node.output_model
    schema = output_model.model_json_schema() if output_model is not None else None  # type: ignore[attr-defined]
    messages: list[dict[str, Any]] = []
    invalid = 0
    tokens = node.tokens or bool(getattr(ctx.app, "stream_tokens", False))
    for turn in range(node.turn_limit):
        step = where if turn == 0 else f"{where}#model{turn}"
        request = ModelRequest(
            agent=node.name, prompt=prompt, model=model_ref if isinstance(model_ref, str) else None,
            messages=tuple(messages), tools=tuple(t.spec for t in tools.values()),
            output_schema=schema,
        )

        hold = budget.Turn(ctx.app, ctx.root, ctx.pipeline.node)

        async def ask(request: ModelRequest = request, step: str = step, turn: int = turn,
                      hold: budget.Turn = hold) -> dict[str, Any]:
            await hold.take()  # a budgeted run's calls go one at a time (see budget.py)
            await hold.check(step)  # inside the step: replays never re-check
            return hold.made(budget.priced(
                ctx.app, await _call_model(model_ref, request, step, turn, tokens)))

        # retries(n) is a durable policy of the whole agent (engine/retry.py), not step retries
        try:
            out = await run_step(step, 0, ask)
        except BaseException:
            await hold.release(recorded=False)
            raise
        await hold.release(recorded=True)  # after the step is recorded: the next check sees it
        response = ModelResponse.from_json(out)
        if ctx.tracer is not None:
            ctx.tracer.model_call(ctx, node.name, response)
        if response.tool_calls:
            messages.append({"role": "model", "text": response.text,
                             "tool_calls": [c.to_json() for c in response.tool_calls]})
            results = await _run_tools(response.tool_calls, tools, where, turn)
            messages.append({"role": "tool", "results": results})
            continue
        if output_model is None:
            return {node.key: response.text}
        try:
            value = output_model.model_validate_json(response.text)  # type: ignore[attr-defined]
        except pydantic.ValidationError as exc:
            invalid += 1
            errors = _errors_text(exc)
            if invalid > OUTPUT_RETRIES:
                raise ModelError(
                    f"agent {where}: the answer does not match {output_model.__name__} after "
                    f"{invalid} tries: {errors}; last answer: {response.text[:300]!r}",
                    node=where, schema=output_model.__name__, errors=errors,
                    answer=response.text[:2000],
                ) from None
            messages.append({"role": "model", "text": response.text})
            messages.append({"role": "user", "text": (
                f"That answer is not valid for the required JSON schema: {errors}. "
                "Reply again with only a JSON value that matches the schema.")})
            continue
        return {node.key: value.model_dump(mode="json")}
    raise ModelError(
        f"agent {where}: no final answer after {node.turn_limit} model turns (the model kept "
        f"asking for tools); raise the bound with .max_turns(n) or make the task smaller",
        node=where, max_turns=node.turn_limit,
    )
