"""Prompt in, text out: ``pipeline.ask(prompt)``, ``ask_async`` and ``stream(prompt)``.

>>> text = pipeline.ask("Write a blog post about AI safety")
>>> for chunk in pipeline.stream("Write a blog post about AI safety"):
...     print(chunk, end="", flush=True)

The prompt goes into the run's state under :data:`PROMPT_KEY` (``"prompt"``), so agents
read it as ``{prompt}``; the answer is the value the pipeline's last agent wrote (the
last one, in pipeline order, whose key the final state holds), as text (a structured
answer as JSON).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import DurapipeError
from ..ir import Agent
from ..state import State
from .eventread import EventType

if TYPE_CHECKING:
    from .runs import Registered, RunHandle, RunResult

PROMPT_KEY = "prompt"


def _inputs(prompt: Any, inputs: dict[str, Any] | None, where: str) -> State:
    if not isinstance(prompt, str):
        raise DurapipeError(f"{where}: the prompt must be a string, not {type(prompt).__name__}")
    return {**(inputs or {}), PROMPT_KEY: prompt}


def answer_of(reg: Registered, state: State) -> str:
    """The text of the last agent of ``reg`` that wrote to ``state``."""
    agents = [n for _, n in reg.node.walk() if isinstance(n, Agent)]
    if not agents:
        raise DurapipeError(f"pipeline {reg.name!r} has no Agent, so ask() has no answer to "
                            "return; use run() and read the state")
    for agent in reversed(agents):
        if agent.key in state:
            value = state[agent.key]
            return value if isinstance(value, str) else json.dumps(value)
    raise DurapipeError(f"pipeline {reg.name!r}: no agent wrote its answer "
                        f"(agent keys: {[a.key for a in agents]})")


class AskMixin:
    """The prompt-in, text-out methods of :class:`~durapipe.engine.runs.Pipeline`."""

    name: str
    _reg: Registered

    start: Callable[..., RunHandle]
    run_async: Callable[..., Awaitable[RunResult]]

    def ask(self, prompt: str, *, inputs: dict[str, Any] | None = None,
            run_id: str | None = None, timeout: float | None = None) -> str:
        """Run with ``prompt`` in state under ``"prompt"``; return the last agent's text."""
        state = _inputs(prompt, inputs, f"pipeline {self.name!r}.ask")
        result = self.start(state, run_id=run_id, timeout=timeout).result(
            timeout=None if timeout is None else timeout + 10)
        return answer_of(self._reg, result.state)

    async def ask_async(self, prompt: str, *, inputs: dict[str, Any] | None = None,
                        run_id: str | None = None, timeout: float | None = None) -> str:
        state = _inputs(prompt, inputs, f"pipeline {self.name!r}.ask_async")
        result = await self.run_async(state, run_id=run_id, timeout=timeout)
        return answer_of(self._reg, result.state)

    def stream(self, prompt: str, *, inputs: dict[str, Any] | None = None,
               run_id: str | None = None) -> Iterator[str]:
        """Run with ``prompt`` and yield the model text as it arrives.

        Agents stream their tokens when marked ``.stream_tokens()`` (or with
        ``App(stream_tokens=True)``); if no token arrived, the answer comes as one chunk at
        the end. A model call run again after a crash goes on from where its text stopped
        (``handle.stream()`` shows the ``model_restarted`` marker). A failed run raises its
        error once the text so far is yielded.
        """
        handle = self.start(_inputs(prompt, inputs, f"pipeline {self.name!r}.stream"),
                            run_id=run_id)
        sent: dict[str, int] = {}    # per model call (path): characters yielded
        seen: dict[str, int] = {}    # per model call: characters of its current attempt
        any_token = False
        for event in handle.stream():
            where = f"{event.path}:{event.name}"
            if event.type is EventType.MODEL_RESTARTED:
                seen[where] = 0
            elif event.type is EventType.TOKEN:
                text = str(event.data.get("text", ""))
                start = seen.get(where, 0)
                seen[where] = start + len(text)
                skip = max(0, sent.get(where, 0) - start)
                if skip < len(text):
                    any_token = True
                    sent[where] = seen[where]
                    yield text[skip:]
        result = handle.result()
        if not any_token:
            yield answer_of(self._reg, result.state)
