"""Gemini through ``google-genai``'s async client: tools, structured output, streaming, retries.

>>> model = GeminiModel("gemini-2.5-flash")     # key from GEMINI_API_KEY / GOOGLE_API_KEY
>>> agent = Agent("writer", model).instruct("Write about {topic}.")

The API key stays inside the ``genai.Client``: requests, responses, errors and logs carry
none of it. Transient failures (429, 5xx, timeouts, dropped connections) are retried with
exponential backoff and jitter; other 4xx answers cannot succeed and fail at once with a
:class:`~durapipe.errors.ModelError`.

Guard: when ``DURAPIPE_BLOCK_REAL_MODELS=1`` (or under pytest, unless it is ``0``) a client
whose base URL is not loopback is refused before any request is sent.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

from ..errors import ModelError
from .base import ModelRequest, ModelResponse, ToolCall, report_overload

log = logging.getLogger("durapipe.models")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
KEY_VARS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def real_models_blocked() -> bool:
    """True when requests to non-loopback model endpoints are refused (tests)."""
    flag = os.environ.get("DURAPIPE_BLOCK_REAL_MODELS")
    if flag is not None:
        return flag.strip() not in ("", "0", "false", "no")
    return "PYTEST_CURRENT_TEST" in os.environ


def _is_loopback(url: str | None) -> bool:
    host = urlparse(url or "").hostname
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _transient_errors() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = [asyncio.TimeoutError, TimeoutError, ConnectionError]
    for mod_name in ("httpx", "httpx2"):
        try:
            mod = __import__(mod_name)
        except ImportError:
            continue
        out.extend([mod.TimeoutException, mod.NetworkError, mod.RemoteProtocolError])
    return tuple(out)


class GeminiModel:
    """A Gemini model. ``client`` is a ready ``google.genai.Client`` (Vertex, a proxy, a test
    server); without one, a client is built from the environment on first use.

    ``max_attempts`` bounds tries of one request; the wait before retry *n* is
    ``min(max_delay, initial_delay * 2**n)`` scaled by a random factor in [0.5, 1].
    """

    def __init__(
        self,
        model: str = "gemini-2.5-flash",
        client: Any = None,
        *,
        max_attempts: int = 5,
        initial_delay: float = 1.0,
        max_delay: float = 30.0,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ModelError(f"GeminiModel({model!r}): the model name must be a non-empty string")
        self.name = model.removeprefix("models/")
        self._client = client
        self.max_attempts = max(1, max_attempts)
        self.initial_delay = initial_delay
        self.max_delay = max_delay

    def __repr__(self) -> str:
        return f"GeminiModel({self.name!r})"

    # -- client ---------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._client_from_env()
        self._guard(self._client)
        return self._client

    def _client_from_env(self) -> Any:
        from google import genai

        vertex = os.environ.get("GOOGLE_GENAI_USE_VERTEXAI", "").lower() in ("1", "true")
        if not vertex and not any(os.environ.get(v) for v in KEY_VARS):
            raise ModelError(
                f"model {self.name!r}: no Gemini API key; set GEMINI_API_KEY (or GOOGLE_API_KEY, "
                "or GOOGLE_GENAI_USE_VERTEXAI=true with Vertex settings), or pass "
                "GeminiModel(name, client=genai.Client(...))",
                model=self.name,
            )
        return genai.Client()

    def _guard(self, client: Any) -> None:
        if not real_models_blocked():
            return
        api = getattr(client, "_api_client", None)
        base_url = getattr(getattr(api, "_http_options", None), "base_url", None)
        if not _is_loopback(base_url):
            raise ModelError(
                f"model {self.name!r}: real model requests are blocked here "
                f"(DURAPIPE_BLOCK_REAL_MODELS or pytest) and this client targets {base_url!r}; "
                "use FakeModel, or a genai.Client whose http_options.base_url is a loopback "
                "test server",
                model=self.name, base_url=base_url,
            )

    # -- requests -------------------------------------------------------------------------
    def _contents(self, request: ModelRequest) -> list[dict[str, Any]]:
        contents: list[dict[str, Any]] = [{"role": "user", "parts": [{"text": request.prompt}]}]
        for msg in request.messages:
            role = msg.get("role")
            if role == "model":
                parts: list[dict[str, Any]] = []
                if msg.get("text"):
                    parts.append({"text": msg["text"]})
                for call in msg.get("tool_calls") or ():
                    part: dict[str, Any] = {"function_call": {
                        "name": call["name"], "args": call.get("args") or {}, "id": call.get("id")}}
                    if call.get("signature"):
                        part["thought_signature"] = base64.b64decode(call["signature"])
                    parts.append(part)
                contents.append({"role": "model", "parts": parts or [{"text": ""}]})
            elif role == "tool":
                contents.append({"role": "user", "parts": [
                    {"function_response": {"name": r["name"], "id": r.get("id"),
                                           "response": r["response"]}}
                    for r in msg["results"]
                ]})
            else:
                contents.append({"role": "user", "parts": [{"text": str(msg.get("text", ""))}]})
        return contents

    def _config(self, request: ModelRequest) -> Any:
        from google.genai import types

        config: dict[str, Any] = {
            "automatic_function_calling": types.AutomaticFunctionCallingConfig(disable=True),
        }
        if request.tools:
            config["tools"] = [types.Tool(function_declarations=[
                types.FunctionDeclaration(name=t.name, description=t.description,
                                          parameters_json_schema=t.parameters)
                for t in request.tools
            ])]
        if request.output_schema is not None:
            config["response_mime_type"] = "application/json"
            config["response_json_schema"] = request.output_schema
        return types.GenerateContentConfig(**config)

    def _parse(self, response: Any) -> ModelResponse:
        candidates = response.candidates or []
        if not candidates:
            feedback = getattr(response, "prompt_feedback", None)
            reason = getattr(feedback, "block_reason", None)
            raise ModelError(
                f"model {self.name!r} returned no answer"
                + (f": the prompt was blocked ({_enum_text(reason)})" if reason else ""),
                model=self.name, block_reason=_enum_text(reason),
            )
        cand = candidates[0]
        texts: list[str] = []
        calls: list[ToolCall] = []
        for part in (cand.content.parts if cand.content and cand.content.parts else []):
            if part.function_call is not None:
                sig = part.thought_signature
                calls.append(ToolCall(
                    name=part.function_call.name or "", args=dict(part.function_call.args or {}),
                    id=part.function_call.id,
                    signature=base64.b64encode(sig).decode() if sig else None,
                ))
            elif part.text and not part.thought:
                texts.append(part.text)
        usage = response.usage_metadata
        return ModelResponse(
            text="".join(texts),
            model=response.model_version or self.name,
            input_tokens=(usage.prompt_token_count or 0) if usage else 0,
            output_tokens=((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0))
            if usage else 0,
            finish_reason=_enum_text(cand.finish_reason) or "stop",
            tool_calls=tuple(calls),
        )

    async def _with_retries(self, send: Callable[[], Awaitable[Any]]) -> Any:
        from google.genai import errors

        transient = _transient_errors()
        for attempt in range(self.max_attempts):
            try:
                return await send()
            except errors.APIError as exc:
                code = int(exc.code or 0)
                if code not in RETRY_STATUS:
                    raise self._fatal(exc) from None
                why = f"HTTP {code} {exc.status or ''}".strip()
                if attempt + 1 >= self.max_attempts:
                    raise self._gave_up(why) from None
            except transient as exc:
                why = type(exc).__name__
                if attempt + 1 >= self.max_attempts:
                    raise self._gave_up(why) from None
            report_overload(why)
            delay = min(self.max_delay, self.initial_delay * 2 ** attempt) * random.uniform(0.5, 1.0)
            log.info("model %s: %s, retry %d in %.2f s", self.name, why, attempt + 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _fatal(self, exc: Any) -> ModelError:
        code = int(exc.code or 0)
        hint = {
            400: "the request is invalid for this model (check the schema, tools and model name)",
            401: "the API key is missing or wrong (GEMINI_API_KEY / GOOGLE_API_KEY)",
            403: "the API key has no access to this model or API",
            404: f"there is no model named {self.name!r} (or no such endpoint)",
        }.get(code, "the request cannot succeed as it is")
        return ModelError(
            f"model {self.name!r} refused the request: HTTP {code} {exc.status or ''}: "
            f"{exc.message or ''} — {hint}; not retried",
            model=self.name, status_code=code, status=exc.status, detail=exc.message,
        )

    def _gave_up(self, why: str) -> ModelError:
        return ModelError(
            f"model {self.name!r} failed {self.max_attempts} times ({why}); gave up retrying",
            model=self.name, attempts=self.max_attempts, cause=why,
        )

    async def generate(self, request: ModelRequest) -> ModelResponse:
        """One request; transient errors retried, others raised as :class:`ModelError`."""
        client = self.client
        contents, config = self._contents(request), self._config(request)
        response = await self._with_retries(lambda: client.aio.models.generate_content(
            model=self.name, contents=contents, config=config))
        return self._parse(response)

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelResponse]:
        """Yield growing snapshots of the answer; the last one is complete.

        Only opening the stream is retried: once text has arrived, a failure is raised.
        """
        client = self.client
        contents, config = self._contents(request), self._config(request)
        chunks = await self._with_retries(lambda: client.aio.models.generate_content_stream(
            model=self.name, contents=contents, config=config))
        text = ""
        calls: tuple[ToolCall, ...] = ()
        last: ModelResponse | None = None
        async for chunk in chunks:
            if not chunk.candidates:
                continue
            part = self._parse(chunk)
            text += part.text
            calls += part.tool_calls
            last = ModelResponse(
                text=text, model=part.model, input_tokens=part.input_tokens or (
                    last.input_tokens if last else 0),
                output_tokens=part.output_tokens or (last.output_tokens if last else 0),
                finish_reason=part.finish_reason, tool_calls=tuple(calls),
            )
            yield last
        if last is None:
            raise ModelError(f"model {self.name!r} streamed no answer", model=self.name)


def _enum_text(value: Any) -> str | None:
    if value is None:
        return None
    text = getattr(value, "value", None) or getattr(value, "name", None) or str(value)
    return str(text).lower()
