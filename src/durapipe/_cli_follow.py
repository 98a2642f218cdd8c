"""Following a run in the terminal from its event stream (``durapipe run``, ``show --follow``).

The view is redrawn when an event arrives rather than on a timer, and lists the nodes in
flight (started, not ended) with how long they have run, so the step at work shows while it
works. With ``--tokens`` the command prints a line per node event instead, and the model's
text inline as it streams; a model call that runs again after a crash says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from . import _render
from .engine.eventread import Event, EventReader, EventType

ENDED = (EventType.NODE_FINISHED, EventType.NODE_FAILED, EventType.NODE_SKIPPED)
REDRAW = 0.125  # at most 8 redraws a second


class Flight:
    """What the events say runs now: node path -> (label, started at, epoch seconds)."""

    def __init__(self) -> None:
        self.running: dict[str, tuple[str, float]] = {}
        self.waiting: dict[str, str] = {}

    def see(self, event: Event) -> None:
        path = event.path or ""
        if event.type is EventType.NODE_STARTED and event.kind not in ("seq", "parallel"):
            self.running[path] = (f"{event.name} ({event.kind})", event.at)
        elif event.type in ENDED:
            self.running.pop(path, None)
            self.waiting.pop(path, None)
        elif event.type is EventType.GATE_WAITING:
            self.waiting[path] = str(event.data.get("message") or "")
        elif event.type is EventType.GATE_ANSWERED:
            self.waiting.pop(path, None)
        elif event.type is EventType.RUN_RESUMED:
            self.running.clear()  # a new process replays; what ran before the restart is gone

    def __rich__(self) -> Text:  # redrawn by Live on every refresh: elapsed times tick
        return self.view()

    def view(self) -> Text:
        now = time.time()
        out = Text()
        for path, (label, at) in sorted(self.running.items()):
            wait = f"  waiting for approval: {self.waiting[path]}" if path in self.waiting else ""
            out.append("running ", "yellow")
            out.append_text(_render.literal(f"{path} {label} {_render.duration((now - at) * 1000)}"
                                            f"{wait}\n"))
        return out


def event_line(event: Event) -> Text | None:
    """One line for a node, gate, task or run event; None for a token."""
    t, where = event.type, f"{event.path or ''} {event.name or ''}".strip()
    style = {EventType.NODE_FAILED: "red", EventType.RUN_RESUMED: "magenta",
             EventType.MODEL_RESTARTED: "magenta", EventType.NODE_FINISHED: "green"}.get(t, "")
    if t is EventType.TOKEN:
        return None
    extra = ""
    if "duration_ms" in event.data:
        extra = f" {_render.duration(event.data['duration_ms'])}"
    elif t is EventType.MODEL_RESTARTED:
        extra = " (the model call runs again: its earlier text is void)"
    elif t is EventType.RUN_FINISHED or t is EventType.GATE_ANSWERED:
        extra = f" {event.data.get('status', '')}"
    elif "error" in event.data:
        extra = f" {event.data['error']}"
    return _render.literal(f"[{event.offset}] {t.value} {where}{extra}", style)


def follow(reader: EventReader, run_id: str, console: Console, *, tokens: bool,
           view: Callable[[Flight, bool], RenderableType] | None = None,
           from_offset: int = 0) -> int:
    """Read ``run_id``'s events until it ends; return the next offset.

    ``tokens``: print each event as a line and the model text inline. Otherwise redraw
    ``view(flight, refresh)`` (``refresh``: a node ended since the last redraw) live.
    """
    flight = Flight()
    offset = from_offset
    if tokens or view is None:
        in_text = False
        for event in reader.follow(run_id, offset, idle=0.2):
            offset = event.offset + 1
            flight.see(event)
            if event.type is EventType.TOKEN:
                if tokens:
                    console.print(_render.literal(event.data.get("text", "")), end="",
                                  highlight=False, soft_wrap=True)
                    in_text = True
                continue
            line = event_line(event)
            if line is not None:
                if in_text:
                    console.print()
                    in_text = False
                console.print(line, highlight=False, soft_wrap=True)
        return offset
    drawn, changed = 0.0, True
    with Live(view(flight, True), console=console, refresh_per_second=8) as live:
        for event in reader.follow(run_id, offset, idle=0.2):
            offset = event.offset + 1
            flight.see(event)
            changed = changed or event.type in ENDED or event.type is EventType.RUN_FINISHED
            if time.monotonic() - drawn >= REDRAW or event.type is EventType.RUN_FINISHED:
                live.update(view(flight, changed))
                drawn, changed = time.monotonic(), False
        live.update(view(flight, True))
    return offset


def grouped(*parts: Any) -> RenderableType:
    return Group(*(p for p in parts if p is not None))
