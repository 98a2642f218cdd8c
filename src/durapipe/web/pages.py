"""Server-rendered HTML of the console. Every recorded value is escaped on its way out.

The pipeline diagram is nested boxes (a sequence left to right, branches stacked), each
box coloured by its node's status in the run (``st-success``, ``st-running``, ...); the
timeline places one bar per recorded operation on the run's own time axis.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any
from urllib.parse import urlencode

from .._render import answer_command, duration, when
from ..audit import NodeRecord, RunInfo, RunTree, log_attempts
from ..ir import (
    Dispatch,
    Fallback,
    Gate,
    Join,
    Limit,
    Loop,
    MapOver,
    Node,
    Parallel,
    Race,
    Route,
    Seq,
    Timeout,
)
from ..planner import Flow, Step
from ..runview import one_line_gates, task_note, timeline
from .queries import STATUSES, RunFilter

ACTIVE = ("PENDING", "ENQUEUED", "DELAYED")


def e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def status_class(status: str | None) -> str:
    return "st-" + (status or "pending").lower().replace("_", "-")


def badge(status: str | None) -> str:
    return f'<span class="badge {status_class(status)}">{e(status or "-")}</span>'


def layout(title: str, body: str, *, note: str | None = None, person: str | None = None) -> str:
    who = f'<span class="who">signed in: {e(person)}</span>' if person else \
        '<a class="who" href="/login">sign in</a>'
    flash = f'<p class="note" role="status">{e(note)}</p>' if note else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)} · durapipe</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/console.css"></head>
<body><header><a class="brand" href="/">durapipe</a><nav><a href="/">runs</a>
<a href="/approvals">approvals</a></nav>{who}</header>
<main>{flash}{body}</main><script src="/static/console.js" defer></script></body></html>"""


# -- runs list ---------------------------------------------------------------------------

def runs_page(runs: list[RunInfo], flt: RunFilter, raw: dict[str, str], next_cursor: str | None,
              pipelines: list[str]) -> str:
    def opt(values: list[str], chosen: str | None) -> str:
        return "".join(f'<option value="{e(v)}"{" selected" if v == chosen else ""}>{e(v or "any")}</option>'
                       for v in ["", *values])

    form = f"""<form class="filters" method="get" action="/">
<label>pipeline <select name="pipeline">{opt(pipelines, flt.pipeline)}</select></label>
<label>status <select name="status">{opt(list(STATUSES), (flt.status or "").upper())}</select></label>
<label>since <input name="since" value="{e(raw.get("since"))}" placeholder="2h, 7d or 2026-01-31"></label>
<label>until <input name="until" value="{e(raw.get("until"))}" placeholder="ISO date"></label>
<label>inputs contain <input name="q" value="{e(flt.text)}"></label>
<label>tenant <input name="tenant" value="{e(flt.tenant)}"></label>
<button type="submit">filter</button></form>"""
    rows = "".join(
        f"""<tr><td><a href="/runs/{e(r.run_id)}">{e(r.run_id)}</a></td><td>{e(r.pipeline)}</td>
<td>{e(r.tenant or "")}</td><td>{badge(r.status)}</td><td>{e(when(r.created_ms))}</td><td>{e(duration(r.duration_ms))}</td>
<td class="err">{e((r.error or "")[:120])}</td></tr>""" for r in runs)
    more = ""
    if next_cursor:
        keep = {k: v for k, v in raw.items() if v and k != "after"}
        more = f'<p><a class="next" href="/?{e(urlencode({**keep, "after": next_cursor}))}">older runs →</a></p>'
    table = (f'<table class="runs"><thead><tr><th>run</th><th>pipeline</th><th>tenant</th><th>status</th>'
             f'<th>created (UTC)</th><th>duration</th><th>error</th></tr></thead><tbody>{rows}</tbody></table>'
             if runs else '<p class="empty">no runs match</p>')
    return f"<h1>Runs</h1>{form}{table}{more}"


# -- the diagram -------------------------------------------------------------------------

def _box(path: str, title: str, kind: str, statuses: dict[str, str], sub: str = "") -> str:
    st = statuses.get(path, "PENDING")
    small = f"<small>{e(sub)}</small>" if sub else ""
    return (f'<div class="box kind-{kind} {status_class(st)}" data-path="{e(path)}" data-status="{e(st)}" '
            f'title="{e(path)} · {e(st)}"><b>{e(title)}</b>{small}<i>{e(st.lower())}</i></div>')


def _group(path: str, title: str, kind: str, inner: str, statuses: dict[str, str]) -> str:
    st = statuses.get(path, "PENDING")
    return (f'<div class="group kind-{kind} {status_class(st)}" data-path="{e(path)}" data-status="{e(st)}">'
            f'<div class="group-title">{e(title)}</div><div class="branches">{inner}</div></div>')


def diagram(node: Node, statuses: dict[str, str], path: str = "0") -> str:
    """``node`` as nested HTML boxes coloured by ``statuses`` (node path -> status)."""
    kids = [(f"{path}.{i}", c) for i, c in enumerate(node.children())]
    if isinstance(node, Seq):
        return '<div class="seq">' + '<span class="arrow">→</span>'.join(
            diagram(c, statuses, p) for p, c in kids) + "</div>"
    if isinstance(node, Step):
        return diagram(node.node, statuses, f"{path}.0")
    inner = "".join(diagram(c, statuses, p) for p, c in kids)
    titles: dict[type, str] = {Parallel: "parallel", Race: "race: first success", Fallback: "fallback",
                               Timeout: "timeout", MapOver: "map", Limit: "limit"}
    if isinstance(node, Loop):
        return _group(path, f"loop ×{node.times}" if node.times else "loop until", "loop", inner, statuses)
    if isinstance(node, Flow):
        return _group(path, f"flow → {', '.join(node.goals)}", "flow", inner, statuses)
    if isinstance(node, Route):
        return _group(path, "route", "route", inner, statuses)
    if isinstance(node, Dispatch):
        return _group(path, "dispatch (background): " + ", ".join(node.names), "dispatch", inner, statuses)
    if type(node) in titles:
        return _group(path, titles[type(node)], node.kind, inner, statuses)
    if isinstance(node, Join):
        return _box(path, "join " + (", ".join(node.names) or "all"), "join", statuses)
    if isinstance(node, Gate):
        return _box(path, f"gate {node.name}", "gate", statuses, ", ".join(node.approvers or []))
    return _box(path, node.label, node.kind, statuses, node.kind)


# -- the run page ------------------------------------------------------------------------

def _offset(ms: int | None, t0: int) -> str:
    return "-" if ms is None else f"+{duration(max(ms - t0, 0))}"


def timeline_html(tree: RunTree, now_ms: int, waits: list[dict[str, Any]] | None = None) -> str:
    t0, end, bars = timeline(tree, now_ms, waits)
    span = max(end - t0, 1)
    rows = []
    for b in bars:
        left = 100.0 * (b["start_ms"] - t0) / span
        width = max(100.0 * (b["end_ms"] - b["start_ms"]) / span, 0.4)
        label = f"{b['path'] or ''} {b['name']}".strip()
        rows.append(
            f'<div class="tl-row" style="--depth:{b["depth"]}"><span class="tl-label">{e(label)}</span>'
            f'<div class="tl-track"><div class="tl-bar {status_class(b["status"])}" '
            f'data-path="{e(b["path"])}" style="left:{left:.2f}%;width:{min(width, 100 - left):.2f}%" '
            f'title="{e(label)}: {_offset(b["start_ms"], t0)} for {e(duration(b["end_ms"] - b["start_ms"]))}">'
            f"</div></div></div>")
    if not rows:
        return '<p class="empty">nothing recorded yet</p>'
    return (f'<div class="timeline">{"".join(rows)}<div class="tl-axis"><span>0</span>'
            f"<span>{e(duration(span))}</span></div></div>")


def _json(value: Any, limit: int = 4000) -> str:
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
    if len(text) > limit:
        text = text[:limit] + f"\n… ({len(text) - limit} more characters)"
    return f"<pre>{e(text)}</pre>"


def _logs(logged: dict[str, Any] | None) -> str:
    if not logged:
        return ""
    attempts = log_attempts(logged)
    parts = [f'<div class="muted">{e(logged["dropped"])} record(s) of earlier attempts dropped</div>'
             if logged.get("dropped") else ""]
    for a in attempts:
        if len(attempts) > 1 or a["attempt"] > 1:
            failed = f' failed: {e(a["error"])}' if a.get("error") else ""
            parts.append(f'<div class="attempt" data-attempt="{e(a["attempt"])}">attempt '
                         f'{e(a["attempt"])}{failed}</div>')
        parts += [f'<div class="log log-{e(str(r.get("level", "")).lower())}">{e(r.get("level"))} '
                  f'{e(r.get("logger"))}: {e(r.get("message"))}</div>' for r in a["records"]]
        frames = [f'<div class="frame">at {e(f.get("file"))}:{e(f.get("line"))} in {e(f.get("function"))}'
                  f'<code>{e(f.get("code"))}</code></div>' for f in a.get("traceback") or []]
        parts.append(f'<div class="traceback">{"".join(frames)}</div>' if frames else "")
    return f'<div class="logs">{"".join(parts)}</div>'


def _node_row(n: NodeRecord, t0: int, outputs: dict[tuple[str, str], Any],
              logs: dict[tuple[str, str], dict[str, Any]]) -> str:
    usage = f"{n.model} {n.input_tokens or 0}→{n.output_tokens or 0} tok" if n.model else ""
    extra = []
    if task_note(n):
        extra.append(task_note(n))
    extra += [f"{k}={n.detail[k]}" for k in ("message", "by", "comment") if k in n.detail]
    out = outputs.get((n.workflow_id or "", f"{n.path}:{n.name}"))
    details = f"<details><summary>output</summary>{_json(out)}</details>" if out is not None else ""
    err = f'<div class="err">{e(n.error)}</div>' if n.error else ""
    err += _logs(logs.get((n.workflow_id or "", f"{n.path}:{n.name}")) if n.kind == "step" else None)
    return (f'<tr data-path="{e(n.path)}"><td>{e(n.path or "")}</td><td>{e(n.name)}</td><td>{e(n.kind)}</td>'
            f"<td>{badge(n.status)}</td><td>{_offset(n.started_ms, t0)}</td><td>{e(duration(n.duration_ms))}</td>"
            f'<td>{e(usage)}</td><td>{e("; ".join(extra))}{err}{details}</td></tr>')


def gate_forms(run_id: str, gates: list[dict[str, Any]], ask_name: bool) -> str:
    if not gates:
        return ""
    items = []
    for g in gates:
        name = str(g.get("gate"))
        who = ('<input name="by" placeholder="your name" required>' if ask_name else "")
        base = f"/runs/{e(run_id)}/gates/{e(name)}"
        waits = str(g.get("run_id") or run_id)  # the run's own workflow, or a branch's or task's
        where = (f'<input type="hidden" name="workflow" value="{e(waits)}">'
                 f'<span class="muted">in {e(waits[len(run_id) + 1:])}</span> ' if waits != run_id else "")
        items.append(
            f'<div class="gate" data-gate="{e(name)}" data-workflow="{e(waits)}"><b>gate {e(name)}</b> '
            f'{e(g.get("message"))} '
            f'<span class="muted">approvers: {e(", ".join(map(str, g.get("approvers") or [])) or "anyone")}</span>'
            f'<form method="post" action="{base}/approve">{where}{who}<input name="comment" placeholder="comment">'
            f'<button class="approve" type="submit">approve</button>'
            f'<button class="reject" type="submit" formaction="{base}/reject">reject</button></form>'
            f'<code class="cli">{e(answer_command(waits, name, g.get("approvers")))}</code></div>')
    return '<section class="gates"><h2>Waiting for approval</h2>' + "".join(items) + "</section>"


def run_live(tree: RunTree, node: Node | None, statuses: dict[str, str], now_ms: int,
             outputs: dict[tuple[str, str], Any], gates: list[dict[str, Any]], ask_name: bool,
             logs: dict[tuple[str, str], dict[str, Any]],
             waits: list[dict[str, Any]] | None = None) -> str:
    """The part of the run page the script refreshes while the run is active."""
    r = tree.run
    t0 = r.created_ms or now_ms
    tin, tout = tree.tokens
    head = (f'<div class="run-head" data-run-active="{1 if r.status in ACTIVE else 0}">'
            f"{badge(r.status)} <b>{e(r.pipeline)}</b> created {e(when(r.created_ms))} UTC · "
            f"{e(duration(r.duration_ms if r.duration_ms is not None else now_ms - t0))}"
            + (f" · tokens {tin}→{tout}" if tin or tout else "")
            + (f' · forked from <a href="/runs/{e(r.forked_from)}">{e(r.forked_from)}</a>' if r.forked_from else "")
            + "</div>")
    err = f'<pre class="err run-error">{e(r.error)}</pre>' if r.error else ""
    dia = (f'<div class="diagram">{diagram(node, statuses)}</div>' if node is not None else
           '<p class="empty">this app does not register the pipeline, so no diagram</p>')
    shown = one_line_gates(tree.nodes, r.status)
    nodes = "".join(_node_row(n, t0, outputs, logs) for top in shown for n in top.walk()
                    if n.kind != "dbos-op")
    tasks = [n for n in tree.walk() if n.kind == "task"]
    task_list = "".join(f"<li>{e(n.name)}: {badge(n.status)} {e(task_note(n))}</li>"
                        for n in tasks)
    return (head + err + gate_forms(r.run_id, gates, ask_name)
            + f"<h2>Pipeline</h2>{dia}<h2>Timeline</h2>{timeline_html(tree, now_ms, waits)}"
            + (f"<h2>Background tasks</h2><ul>{task_list}</ul>" if tasks else "")
            + '<h2>Steps</h2><table class="nodes"><thead><tr><th>path</th><th>name</th><th>kind</th>'
              "<th>status</th><th>start</th><th>duration</th><th>model / tokens</th><th>detail</th></tr>"
              f"</thead><tbody>{nodes}</tbody></table>")


def run_page(tree: RunTree, live: str, inputs: Any, paths: list[str]) -> str:
    r = tree.run
    rid = e(r.run_id)
    actions = [f'<form method="post" action="/runs/{rid}/fork">fork from node <select name="node">'
               + "".join(f'<option value="{e(p)}">{e(p)}</option>' for p in paths)
               + '</select> <button type="submit">fork</button></form>' if paths else ""]
    if r.status in ACTIVE:
        actions.append(f'<form method="post" action="/runs/{rid}/cancel"><button class="reject" '
                       'type="submit">cancel run</button></form>')
    if r.status in ("CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED", *ACTIVE):
        actions.append(f'<form method="post" action="/runs/{rid}/resume"><button type="submit">'
                       "resume run</button></form>")
    active = 1 if r.status in ACTIVE else 0
    return (f"<h1>Run {rid}</h1><div class=\"actions\">{''.join(actions)}</div>"
            f'<div id="live" data-live-src="/runs/{rid}/live" data-events-src="/runs/{rid}/events" '
            f'data-live-active="{active}">{live}</div>'
            f"<h2>Inputs</h2>{_json(inputs)}"
            + (f"<h2>State</h2>{_json(tree.output, 20000)}" if tree.output is not None else ""))


def approvals_page(gates: list[dict[str, Any]], ask_name: bool) -> str:
    if not gates:
        return '<h1>Approvals</h1><p class="empty">no gate is waiting</p>'
    parts = []
    for g in gates:
        root = str(g.get("root") or g["run_id"])
        parts.append(f'<h2><a href="/runs/{e(root)}">{e(root)}</a> · requested '
                     f'{e(when(g.get("requested_at")))} UTC</h2>' + gate_forms(root, [g], ask_name))
    return "<h1>Approvals</h1>" + "".join(parts)


def message_page(title: str, text: str, back: str | None = None) -> str:
    link = f'<p><a href="{e(back)}">back</a></p>' if back else ""
    return f'<h1>{e(title)}</h1><p class="message">{e(text)}</p>{link}'


def login_page(next_url: str, error: str | None = None) -> str:
    err = f'<p class="err">{e(error)}</p>' if error else ""
    return (f"<h1>Sign in</h1>{err}<form method=\"post\" action=\"/login\">"
            f'<input type="hidden" name="next" value="{e(next_url)}">'
            '<label>token <input type="password" name="token" autocomplete="current-password" required>'
            '</label> <button type="submit">sign in</button></form>')


__all__ = ["approvals_page", "diagram", "layout", "login_page", "message_page", "run_live",
           "run_page", "runs_page", "timeline_html"]
