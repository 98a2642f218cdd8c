"""A pipeline drawn as SVG without any outside tool, and as PNG through a headless Chromium.

``durapipe graph --format svg|png`` prefers Mermaid's own renderer (``mmdc``) when it is
installed; without it, :func:`svg` draws the pipeline as the console does: a sequence top to
bottom with arrows, each composite (parallel, race, fallback, loop, timeout, map, route,
dispatch, flow) a labelled frame holding its branches side by side, and leaves shaped by
kind (agent, function, transform, gate, sleep, join). Boxes carry their node path
(``data-path``), and ``statuses`` colours them as the console does. PNG is that SVG
photographed by ``chromium --headless`` when Chromium is installed.

>>> open("publish.svg", "w").write(svg(publish.node))
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path

from .errors import OperatorError
from .ir import (
    Agent,
    Dispatch,
    Fallback,
    Fn,
    Gate,
    Join,
    Loop,
    MapOver,
    Node,
    Parallel,
    Race,
    Route,
    Seq,
    Sleep,
    Timeout,
    Transform,
)
from .planner import Flow, Step

CHAR_W, PAD, GAP, LEAF_H, TITLE_H = 7.0, 10.0, 22.0, 40.0, 20.0
FILL = {"agent": "#e7f0ff", "fn": "#eef7ee", "transform": "#f6f6f6", "gate": "#fff4d6",
        "sleep": "#f3ecff", "join": "#e8f6f8", "dispatch": "#e8f6f8"}
STATUS_FILL = {"SUCCESS": "#c9f0d3", "RUNNING": "#cfe2ff", "WAITING": "#ffe8a3", "ERROR": "#f8c9cc",
               "CANCELLED": "#e2e3e5", "APPROVED": "#c9f0d3", "REJECTED": "#f8c9cc"}


@dataclass
class _Box:
    w: float
    h: float
    draw: Callable[[float, float], list[str]]  # top-left corner -> SVG elements


def _t(s: object) -> str:
    return escape(str(s), quote=True)


def _width(*texts: str) -> float:
    return max(len(t) for t in texts) * CHAR_W + 2 * PAD


def _leaf(path: str, title: str, kind: str, sub: str, statuses: dict[str, str]) -> _Box:
    w = max(_width(title, sub), 90.0)
    status = statuses.get(path)
    fill = STATUS_FILL.get(status or "", FILL.get(kind, "#ffffff"))

    def draw(x: float, y: float) -> list[str]:
        r, h = (LEAF_H / 2 if kind in ("sleep", "fn") else 4), LEAF_H
        if kind == "gate":  # a hexagon
            k = 10
            pts = f"{x + k},{y} {x + w - k},{y} {x + w},{y + h / 2} {x + w - k},{y + h} {x + k},{y + h} {x},{y + h / 2}"
            shape = f'<polygon points="{pts}" fill="{fill}" stroke="#555"/>'
        elif kind in ("dispatch", "join"):  # a parallelogram
            k = 8
            pts = f"{x + k},{y} {x + w},{y} {x + w - k},{y + h} {x},{y + h}"
            shape = f'<polygon points="{pts}" fill="{fill}" stroke="#555"/>'
        else:
            dash = ' stroke-dasharray="4 3"' if kind == "transform" else ""
            shape = f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{min(r, 14)}" fill="{fill}" stroke="#555"{dash}/>'
        sub_text = (f'<text x="{x + w / 2}" y="{y + 31}" font-size="10" fill="#555" '
                    f'text-anchor="middle">{_t(sub)}</text>') if sub else ""
        return [f'<g class="node kind-{kind}" data-path="{_t(path)}" data-status="{_t(status or "")}">'
                f'<title>{_t(path)} {_t(kind)}</title>{shape}'
                f'<text x="{x + w / 2}" y="{y + (17 if sub else 24)}" font-size="12" text-anchor="middle">'
                f'{_t(title)}</text>{sub_text}</g>']

    return _Box(w, LEAF_H, draw)


def _arrow(x: float, y1: float, y2: float) -> str:
    return (f'<line x1="{x}" y1="{y1}" x2="{x}" y2="{y2 - 1}" stroke="#555" '
            f'marker-end="url(#arrow)"/>')


def _seq(parts: list[_Box]) -> _Box:
    w = max(p.w for p in parts)
    h = sum(p.h for p in parts) + GAP * (len(parts) - 1)

    def draw(x: float, y: float) -> list[str]:
        out: list[str] = []
        for i, p in enumerate(parts):
            if i:
                out.append(_arrow(x + w / 2, y - GAP, y))
            out += p.draw(x + (w - p.w) / 2, y)
            y += p.h + GAP
        return out

    return _Box(w, h, draw)


def _frame(path: str, title: str, kind: str, parts: list[_Box], statuses: dict[str, str]) -> _Box:
    inner_w = sum(p.w for p in parts) + PAD * (len(parts) - 1)
    w = max(inner_w, _width(title)) + 2 * PAD
    h = TITLE_H + max((p.h for p in parts), default=0) + 2 * PAD
    status = statuses.get(path)

    def draw(x: float, y: float) -> list[str]:
        stroke = "#1f6feb" if status == "RUNNING" else "#888"
        out = [f'<g class="group kind-{kind}" data-path="{_t(path)}" data-status="{_t(status or "")}">'
               f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="none" stroke="{stroke}" '
               f'stroke-dasharray="{"5 3" if kind == "dispatch" else "none"}"/>'
               f'<text x="{x + PAD}" y="{y + 15}" font-size="11" fill="#444">{_t(title)}</text></g>']
        cx = x + (w - inner_w) / 2
        for p in parts:
            out += p.draw(cx, y + TITLE_H + PAD)
            cx += p.w + PAD
        return out

    return _Box(w, h, draw)


def _layout(node: Node, path: str, statuses: dict[str, str]) -> _Box:
    kids = [(f"{path}.{i}", c) for i, c in enumerate(node.children())]
    parts = [_layout(c, p, statuses) for p, c in kids]
    if isinstance(node, Seq):
        return _seq(parts)
    if isinstance(node, Step):
        return _layout(node.node, f"{path}.0", statuses)
    if isinstance(node, Loop):
        return _frame(path, f"loop ×{node.times}" if node.times else f"loop until (max {node.until.max if node.until else '?'})",
                      "loop", parts, statuses)
    if isinstance(node, Flow):
        return _frame(path, f"flow → {', '.join(node.goals)}", "flow", parts, statuses)
    if isinstance(node, Route):
        labels = [f"route {node.selector}" if isinstance(node.selector, str) else "route"]
        return _frame(path, labels[0], "route", parts, statuses)
    if isinstance(node, Dispatch):
        return _frame(path, "dispatch (background): " + ", ".join(node.names), "dispatch", parts, statuses)
    if isinstance(node, Timeout):
        return _frame(path, f"timeout {node.seconds:g}s", "timeout", parts, statuses)
    if isinstance(node, MapOver):
        return _frame(path, f"map over {node.items_key} → {node.output_key}", "map", parts, statuses)
    titles: dict[type, str] = {Parallel: "parallel: all branches", Race: "race: first success wins",
                               Fallback: "fallback: first success"}
    if type(node) in titles:
        return _frame(path, titles[type(node)], node.kind, parts, statuses)
    if isinstance(node, Join):
        wait = f" (≤{node.timeout_seconds:g}s)" if node.timeout_seconds else ""
        return _leaf(path, "join " + (", ".join(node.names) or "all") + wait, "join", "", statuses)
    if isinstance(node, Gate):
        return _leaf(path, f"gate {node.name}", "gate", ", ".join(node.approvers or []), statuses)
    if isinstance(node, Agent):
        model = node.model_ref if isinstance(node.model_ref, str) else ""
        return _leaf(path, node.name, "agent", f"agent {model}".strip(), statuses)
    if isinstance(node, Sleep):
        return _leaf(path, f"sleep {node.seconds:g}s", "sleep", "", statuses)
    if isinstance(node, (Fn, Transform)):
        return _leaf(path, node.label, node.kind, node.kind, statuses)
    return _leaf(path, node.label, node.kind, node.kind, statuses)  # a node kind added later


def svg(node: Node, statuses: dict[str, str] | None = None, title: str | None = None) -> str:
    """``node`` as a standalone SVG document (see the module docstring)."""
    box = _layout(node, "0", statuses or {})
    top = 30.0 if title else PAD
    w, h = box.w + 2 * PAD, box.h + top + PAD
    head = (f'<text x="{PAD}" y="20" font-size="14" font-weight="bold">{_t(title)}</text>' if title else "")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {w:.0f} {h:.0f}" font-family="sans-serif">'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>'
            f'<rect width="100%" height="100%" fill="white"/>{head}'
            + "".join(box.draw(PAD, top)) + "</svg>\n")


def chromium() -> str | None:
    """The Chromium executable that can photograph an SVG, if one is installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def write_png(svg_text: str, out_path: str) -> None:
    """Photograph ``svg_text`` with headless Chromium into ``out_path``."""
    exe = chromium()
    if exe is None:
        raise OperatorError(
            "no renderer for --format png: install Mermaid's mmdc (`npm i -g @mermaid-js/mermaid-cli`) "
            "or Chromium (`apt-get install chromium`), or use --format svg, which needs neither")
    size = re.search(r'width="(\d+)" height="(\d+)"', svg_text)
    w, h = (int(size.group(1)), int(size.group(2))) if size else (1200, 900)
    w, h = max(w, 500), max(h, 400)  # a smaller headless window cuts the picture short
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "diagram.svg"
        page.write_text(svg_text)
        shot = Path(tmp) / "diagram.png"
        done = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp}/profile", f"--screenshot={shot}", f"--window-size={w},{h}",
             page.as_uri()], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0 or not shot.exists():
            raise OperatorError(f"chromium failed to render {out_path!r}: {done.stderr.strip()[-300:]}")
        shutil.copyfile(shot, out_path)


__all__ = ["chromium", "svg", "write_png"]
