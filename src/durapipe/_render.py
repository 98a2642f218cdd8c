"""Terminal rendering for the CLI: run tables, run trees and the live node view."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .audit import NodeRecord, RunInfo, RunTree, path_key
from .ir import Node

_STYLE = {"SUCCESS": "green", "ERROR": "red", "CANCELLED": "yellow", "PENDING": "cyan",
          "ENQUEUED": "blue", "WAITING": "magenta", "APPROVED": "green", "REJECTED": "red",
          "TIMED_OUT": "red", "MAX_RECOVERY_ATTEMPTS_EXCEEDED": "red", "RUNNING": "cyan"}
_MARK = {"SUCCESS": "✓", "ERROR": "✗", "CANCELLED": "⊘", "PENDING": "…", "RUNNING": "…",
         "WAITING": "⏸", "APPROVED": "✓", "REJECTED": "✗"}


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(value: object) -> str:
    """Recorded text as it may reach a terminal: control characters shown escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))


def literal(value: object, style: str = "") -> Text:
    """Recorded text (names, ids, messages) for Rich: never read as markup, no escapes."""
    return Text(clean(value), style=style)


def duration(ms: int | float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    return f"{ms / 60_000:.1f}m"


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def status_text(status: str) -> Text:
    return Text(f"{_MARK.get(status, '•')} {status}", style=_STYLE.get(status, ""))


def runs_table(runs: list[RunInfo]) -> Table:
    table = Table(title=f"{len(runs)} run(s)")
    for col in ("run", "pipeline", "status", "created (UTC)", "duration", "executor", "error"):
        table.add_column(col, overflow="fold")
    for r in runs:
        table.add_row(literal(r.run_id), literal(r.pipeline or "-"), status_text(r.status),
                      when(r.created_ms), duration(r.duration_ms), literal(r.executor_id or "-"),
                      literal((r.error or "")[:80]))
    return table


def shapes_table(shapes: list[Any]) -> Table:
    """The drain report: one row per pipeline shape (``drain.ShapeRow``)."""
    table = Table(title=f"{len(shapes)} shape(s)")
    for col in ("app", "pipeline", "shape", "first seen", "last seen", "running", "gate",
                "sleeping", "waiting"):
        table.add_column(col, overflow="fold")
    for s in shapes:
        table.add_row(*(literal(str(v)) for v in (
            s.app, s.pipeline, s.shape, s.first_seen or "-", s.last_seen or "-", s.running, s.gate,
            s.sleeping, s.waiting)))
    return table


def run_verdict(r: dict[str, Any]) -> str:
    """One line of ``check-compat``: what the new code does with one unfinished run."""
    line = f"{r['verdict']:8} run {r['run_id']} ({r['pipeline']}, shape {r['shape']} -> {r['new_shape']})"
    return line + (f": {r['reason']}" if r["verdict"] == "wait" else "")


def manifest_verdict(r: dict[str, Any]) -> str:
    """One line of ``check-compat --manifest``: from which node on a pipeline's runs wait."""
    where = (f"runs that reached node {r['wait_from']} would wait: {r['reason']}"
             if r["wait_from"] else "every run would continue")
    return f"{r['pipeline']} {r['shape']} -> {r['new_shape']}: {where}"


def _label(n: NodeRecord) -> Text:
    text = Text()
    if n.path:
        text.append(f"{clean(n.path)} ", style="dim")
    text.append(clean(n.name), style="bold")
    if n.kind not in ("step",):
        text.append(f" [{n.kind}]", style="dim")
    text.append("  ")
    text.append_text(status_text(n.status))
    text.append(f"  {duration(n.duration_ms)}", style="dim")
    if n.model:
        text.append(f"  {n.model} {n.input_tokens or 0}→{n.output_tokens or 0} tok", style="blue")
    task = n.detail.get("task_status")
    if task:
        text.append(clean(f"  task {n.detail.get('task')}: {task}"), style="magenta")
    for key in ("message", "by", "comment"):
        if key in n.detail:
            text.append(clean(f"  {key}={n.detail[key]!s}"), style="magenta")
    if n.error:
        text.append(f"\n    {clean(n.error)}", style="red")
    return text


def run_tree(tree: RunTree, show_ops: bool = False) -> Tree:
    r = tree.run
    head = Text(f"run {clean(r.run_id)}  ", style="bold")
    head.append(f"{clean(r.pipeline or '?')}  ")
    head.append_text(status_text(r.status))
    head.append(f"  {duration(r.duration_ms)}  created {when(r.created_ms)} UTC", style="dim")
    tin, tout = tree.tokens
    if tin or tout:
        head.append(f"  tokens {tin}→{tout}", style="blue")
    root = Tree(head)
    _add(root, tree.nodes, show_ops)
    if r.error:
        root.add(literal(f"error: {r.error}", style="red"))
    return root


def _add(parent: Tree, nodes: list[NodeRecord], show_ops: bool) -> None:
    for n in nodes:
        if n.kind == "dbos-op" and not show_ops:
            continue
        branch = parent.add(_label(n))
        _add(branch, n.children, show_ops)


def live_table(node: Node, tree: RunTree | None, run_status: str) -> Table:
    """The pipeline's leaf nodes with what the run recorded for each so far."""
    recorded: dict[str, NodeRecord] = {}
    if tree is not None:
        for n in tree.walk():
            if n.path is not None and n.kind in ("step", "child", "task"):
                base = n.path.split("#")[0] if "#" in n.path else n.path
                recorded.setdefault(base, n)
    leaves = [(p, n) for p, n in node.walk() if not n.children()]
    leaves.sort(key=lambda pn: path_key(pn[0]))
    done = sum(1 for p, _ in leaves if p in recorded)
    table = Table(title=f"{done}/{len(leaves)} nodes recorded · run {run_status}")
    for col in ("node", "name", "status", "duration", "model / tokens"):
        table.add_column(col)
    for path, leaf in leaves:
        rec = recorded.get(path)
        status = rec.status if rec else ("RUNNING" if run_status == "PENDING" else "-")
        usage = clean(f"{rec.model} {rec.input_tokens}→{rec.output_tokens}") if rec and rec.model else ""
        table.add_row(path, literal(leaf.label), status_text(status) if status != "-" else Text("· waiting", "dim"),
                      duration(rec.duration_ms if rec else None), usage)
    return table


def jsonable(obj: Any) -> Any:
    return obj.to_json() if hasattr(obj, "to_json") else obj
