"""Terminal rendering for the CLI: run tables, run trees and the live node view."""

from __future__ import annotations

import re
import shlex
from datetime import datetime, timezone
from typing import Any

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .audit import NodeRecord, RunInfo, RunTree, log_attempts, path_key
from .ir import Node
from .runview import base_path, node_statuses, one_line_gates, task_note, timeline

_STYLE = {"SUCCESS": "green", "ERROR": "red", "CANCELLED": "yellow", "PENDING": "cyan",
          "ENQUEUED": "blue", "WAITING": "magenta", "APPROVED": "green", "REJECTED": "red",
          "TIMED_OUT": "red", "MAX_RECOVERY_ATTEMPTS_EXCEEDED": "red", "RUNNING": "cyan"}
_MARK = {"SUCCESS": "✓", "ERROR": "✗", "CANCELLED": "⊘", "PENDING": "…", "RUNNING": "…",
         "WAITING": "⏸", "APPROVED": "✓", "REJECTED": "✗", "SKIPPED": "-", "UNANSWERED": "⊘"}


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(value: object) -> str:
    """Recorded text as it may reach a terminal: control characters shown escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))


def literal(value: object, style: str = "") -> Text:
    """Recorded text (names, ids, messages) for Rich: never read as markup, no escapes."""
    return Text(clean(value), style=style)


def command(value: str, style: str = "magenta") -> Text:
    """A command to copy: one line however narrow the terminal (never wrapped or cut)."""
    return Text(clean(value), style=style, no_wrap=True, overflow="ignore")


def duration(ms: int | float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.1f}m"
    if ms < 86_400_000:
        return f"{ms / 3_600_000:.1f}h"
    return f"{ms / 86_400_000:.1f}d"


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def requested(ms: Any) -> str:
    """A gate's request time (epoch ms) as a UTC time and how long ago, e.g. ``... (3m ago)``."""
    if not isinstance(ms, (int, float)) or isinstance(ms, bool):
        return "-"
    ago = datetime.now(timezone.utc).timestamp() * 1000 - ms
    return f"{when(int(ms))} UTC ({duration(max(ago, 0))} ago)"


def status_text(status: str) -> Text:
    return Text(f"{_MARK.get(status, '•')} {status}", style=_STYLE.get(status, ""))


def runs_table(runs: list[RunInfo]) -> Table:
    table = Table(title=f"{len(runs)} run(s)")
    tenants = any(r.tenant for r in runs)  # a tenant column only where runs have tenants
    for col in ("run", "pipeline", *(("tenant",) if tenants else ()), "status", "created (UTC)",
                "duration", "executor", "error"):
        table.add_column(col, overflow="fold")
    for r in runs:
        table.add_row(literal(r.run_id), literal(r.pipeline or "-"),
                      *((literal(r.tenant or "-"),) if tenants else ()), status_text(r.status),
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


def _label(n: NodeRecord, offset: str = "") -> Text:
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
    if task_note(n):
        text.append(clean(f"  {task_note(n)}"), style="magenta")
    for key in ("message", "by", "comment"):
        if key in n.detail:
            text.append(clean(f"  {key}={n.detail[key]!s}"), style="magenta")
    if offset:
        text.append(f"  {offset}", style="dim")
    if n.error:
        text.append(f"\n    {clean(n.error)}", style="red")
    return text


def answer_command(run_id: str, gate: str, approvers: Any = None, database: str | None = None) -> str:
    """The exact ``durapipe approve`` command that answers a waiting gate (``--by`` is the
    gate's only approver when it has one; ``database`` when DURAPIPE_DATABASE_URL is unset)."""
    only = approvers[0] if isinstance(approvers, list) and len(approvers) == 1 else None
    by = shlex.quote(str(only)) if only is not None else "NAME"
    cmd = f"durapipe approve {shlex.quote(run_id)} {shlex.quote(gate)} --by {by}"
    if database:
        cmd += f" --database-url {shlex.quote(database)}"
    if isinstance(approvers, list) and len(approvers) > 1:
        cmd += f"   (approvers: {', '.join(map(str, approvers))})"
    return cmd + "   (or durapipe reject ...)"


def run_tree(tree: RunTree, show_ops: bool = False,
             logs: dict[tuple[str, str], dict[str, Any]] | None = None,
             database: str | None = None) -> Tree:
    r = tree.run
    head = Text(f"run {clean(r.run_id)}  ", style="bold")
    head.append(f"{clean(r.pipeline or '?')}  ")
    head.append_text(status_text(r.status))
    head.append(f"  {duration(r.duration_ms)}  created {when(r.created_ms)} UTC", style="dim")
    tin, tout = tree.tokens
    if tin or tout:
        head.append(f"  tokens {tin}→{tout}", style="blue")
    root = Tree(head)
    t0 = r.created_ms
    shown = one_line_gates(tree.nodes, r.status)
    _add(root, shown, show_ops, t0, logs or {})
    for g in shown:
        if g.kind == "gate" and g.status == "WAITING":
            root.add(command("answer: " + answer_command(r.run_id, g.name, g.detail.get("approvers"),
                                                         database)))
    if r.error:
        root.add(literal(f"error: {r.error}", style="red"))
    return root


def _add(parent: Tree, nodes: list[NodeRecord], show_ops: bool, t0: int | None,
         logs: dict[tuple[str, str], dict[str, Any]]) -> None:
    for n in nodes:
        if n.kind == "dbos-op" and not show_ops:
            continue
        at = f"@+{duration(max(n.started_ms - t0, 0))}" if t0 is not None and n.started_ms is not None else ""
        label = _label(n, at)
        branch = parent.add(label)
        logged = logs.get((n.workflow_id or "", f"{n.path}:{n.name}")) if n.kind == "step" else None
        if logged:
            branch.add(step_log_text(logged))
        _add(branch, n.children, show_ops, t0, logs)


def step_log_text(logged: dict[str, Any]) -> Text:
    """A step's captured log records and, when it failed, its user-code frames; a retried
    step's attempts one after the other, each failed one with its error."""
    text = Text()
    attempts = log_attempts(logged)
    if logged.get("dropped"):
        text.append(f"({logged['dropped']} record(s) of earlier attempts dropped)\n", style="dim")
    for a in attempts:
        if len(attempts) > 1 or a["attempt"] > 1:
            text.append(f"attempt {a['attempt']}" + (f" failed: {clean(a['error'])}\n" if a.get("error")
                                                       else "\n"), style="bold")
        for rec in a["records"]:
            text.append(f"{rec.get('level', '?'):<7} ", style="yellow" if rec.get("level") == "WARNING" else "dim")
            text.append(clean(f"{rec.get('logger')}: {rec.get('message')}\n"))
            if rec.get("dropped"):
                text.append(f"        ({rec['dropped']} more records dropped)\n", style="dim")
        for fr in a.get("traceback") or []:
            text.append(clean(f"  at {fr.get('file')}:{fr.get('line')} in {fr.get('function')}"), style="red")
            text.append(clean(f"  {fr.get('code')}\n" if fr.get("code") else "\n"), style="dim")
    text.rstrip()
    return text


def text_timeline(tree: RunTree, now_ms: int, width: int = 40,
                  waits: list[dict[str, Any]] | None = None) -> Text:
    """One bar per recorded step, child workflow, task, gate, join and sleep on the run's
    time axis (``waits``: :func:`runview.wait_bars`)."""
    t0, end, bars = timeline(tree, now_ms, waits)
    span = max(end - t0, 1)
    text = Text(f"timeline 0 → {duration(span)}\n", style="dim")
    labels = [f"{b['path'] or ''} {b['name']}".strip() for b in bars]
    name_width = min(max((len(label) + 2 * b["depth"] for label, b in zip(labels, bars, strict=True)),
                         default=4), 32)
    for label, b in zip(labels, bars, strict=True):
        start = int(width * (b["start_ms"] - t0) / span)
        length = max(1, round(width * (b["end_ms"] - b["start_ms"]) / span))
        name = ("  " * b["depth"] + label)[:name_width]
        text.append(clean(name).ljust(name_width) + " ")
        text.append(" " * start + "█" * min(length, width - start or 1), style=_STYLE.get(b["status"], ""))
        text.append("\n")
    return text


def live_table(node: Node, tree: RunTree | None, run_status: str) -> Table:
    """The pipeline's leaf nodes with one status each: done, running (the step in flight),
    waiting (a gate), or pending (not reached yet)."""
    statuses = node_statuses(node, tree)
    recorded: dict[str, NodeRecord] = {}
    usage: dict[str, tuple[str, int, int]] = {}
    if tree is not None:
        merged = RunTree(tree.run, one_line_gates(tree.nodes, tree.run.status))
        for n in merged.walk():
            if n.path is not None and n.kind in ("step", "child", "task", "gate"):
                recorded.setdefault(base_path(n.path), n)
            if n.path is not None and n.model:
                m, tin, tout = usage.get(base_path(n.path), (n.model, 0, 0))
                usage[base_path(n.path)] = (m, tin + (n.input_tokens or 0), tout + (n.output_tokens or 0))
    leaves = [(p, n) for p, n in node.walk() if not n.children()]
    leaves.sort(key=lambda pn: path_key(pn[0]))
    done = sum(1 for p, _ in leaves if statuses.get(p) in ("SUCCESS", "APPROVED", "SKIPPED"))
    table = Table(title=f"{done}/{len(leaves)} nodes done · run {run_status}")
    for col in ("node", "name", "status", "duration", "model / tokens"):
        table.add_column(col)
    for path, leaf in leaves:
        rec = recorded.get(path)
        status = statuses.get(path, "PENDING")
        tokens = clean(f"{usage[path][0]} {usage[path][1]}→{usage[path][2]}") if path in usage else ""
        shown = Text("· pending", "dim") if status == "PENDING" else status_text(status)
        table.add_row(path, literal(leaf.label), shown, duration(rec.duration_ms if rec else None), tokens)
    return table


def jsonable(obj: Any) -> Any:
    return obj.to_json() if hasattr(obj, "to_json") else obj
