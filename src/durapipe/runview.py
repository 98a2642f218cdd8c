"""What a run says about each node of its pipeline: one status per node path.

>>> statuses = node_statuses(pipeline.node, admin.tree("post-42"))
>>> statuses["0.2"]
'RUNNING'

Steps are recorded when they finish, so a step in flight has no row yet; a node is shown
RUNNING when the run is active and the node before it in its sequence is done. Nodes that
record nothing of their own (joins, transforms, routes, sleeps) are done once a node after
them has started, or once the run has succeeded and every node around them had to run (a
join at the end of the pipeline). Nodes never reached are PENDING; once a run has
succeeded, a node it never ran (a route's branch not taken) is SKIPPED, and a gate left
waiting by an ended run is UNANSWERED.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from .audit import NodeRecord, RunTree, path_key
from .ir import Dispatch, Gate, Limit, Loop, Node, Parallel, Race, Route, Seq, Timeout

ACTIVE_RUN = ("PENDING", "ENQUEUED", "DELAYED")
DONE = ("SUCCESS", "APPROVED")
FAILED = ("ERROR", "REJECTED", "TIMED_OUT", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")
_GATE = {"waiting": "WAITING", "approved": "APPROVED", "rejected": "REJECTED",
         "timed_out": "TIMED_OUT", "skipped": "SKIPPED"}
_MARKS = re.compile(r"#\d+")


def base_path(path: str) -> str:
    """``0.3#2.1`` (instance 2 of a loop or map body) -> ``0.3.1``."""
    return _MARKS.sub("", path)


def _merge(statuses: list[str]) -> str:
    for s in ("ERROR", "REJECTED", "TIMED_OUT", "CANCELLED", "WAITING", "RUNNING"):
        if s in statuses:
            return s
    return "SUCCESS"


def recorded_statuses(tree: RunTree) -> dict[str, str]:
    """Status per node path from the run's own records (steps, child workflows, tasks)."""
    seen: dict[str, list[str]] = {}
    for rec in tree.walk():
        if rec.path is None or rec.kind not in ("step", "child", "task"):
            continue
        status = "RUNNING" if rec.status in ACTIVE_RUN else rec.status
        seen.setdefault(base_path(rec.path), []).append(status)
    return {p: _merge(s) for p, s in seen.items()}


def _gate_statuses(node: Node, records: list[NodeRecord]) -> dict[str, str]:
    by_name: dict[str, str] = {}
    for rec in records:
        if rec.kind == "gate":
            by_name[rec.name] = _GATE.get(rec.status.lower(), rec.status)
    return {p: by_name[n.name] for p, n in node.walk() if isinstance(n, Gate) and n.name in by_name}


def node_statuses(node: Node, tree: RunTree | None) -> dict[str, str]:
    """Status of every node path of ``node`` in the run ``tree`` (PENDING when not reached)."""
    if tree is None:
        return {p: "PENDING" for p, _ in node.walk()}
    own = recorded_statuses(tree)
    own.update(_gate_statuses(node, tree.walk()))
    active = tree.run.status in ACTIVE_RUN
    out: dict[str, str] = {}
    _resolve(node, "0", own, out, active, reached=True)
    if tree.run.status == "SUCCESS":
        _ran(node, "0", out)
    if not active:
        final = "SKIPPED" if tree.run.status == "SUCCESS" else "PENDING"
        for p, s in out.items():
            if s == "RUNNING":  # nothing runs once the run has ended
                out[p] = "CANCELLED" if tree.run.status == "CANCELLED" else final
            elif s == "WAITING":  # a gate nobody answered before the run ended
                out[p] = "UNANSWERED"
            elif s == "PENDING" and tree.run.status == "SUCCESS":  # e.g. a route's other branch
                out[p] = "SKIPPED"
    return out


def _resolve(node: Node, path: str, own: dict[str, str], out: dict[str, str],
             active: bool, reached: bool) -> str:
    kids = [(f"{path}.{i}", c) for i, c in enumerate(node.children())]
    if isinstance(node, Seq):
        statuses = [_resolve(c, p, own, out, active, reached=False) for p, c in kids]
        # a node with no record of its own is done once something after it started
        last_started = max((i for i, s in enumerate(statuses) if s != "PENDING"), default=-1)
        for i, (p, c) in enumerate(kids):
            if i < last_started and statuses[i] == "PENDING":
                _ran(c, p, out)
                statuses[i] = out[p]
        # the first node not yet recorded after a finished one is the one in flight
        if active and (reached or last_started >= 0):
            nxt = 0 if last_started < 0 else (last_started + 1 if statuses[last_started] in DONE else -1)
            if 0 <= nxt < len(kids) and statuses[nxt] == "PENDING":
                _mark_running(kids[nxt][1], kids[nxt][0], out)
                statuses[nxt] = "RUNNING"
        started = [s for s in statuses if s != "PENDING"]
        if not started:
            status = "PENDING"
        elif len(started) < len(statuses) and active:
            status = _merge(started + ["RUNNING"])
        else:
            status = _merge(started)
        out[path] = status
        return status
    child_statuses = [_resolve(c, p, own, out, active, reached=False) for p, c in kids]
    if path in own:
        status = own[path]
    elif isinstance(node, Dispatch):
        status = "SUCCESS" if any(s != "PENDING" for s in child_statuses) else "PENDING"
    else:
        started = [s for s in child_statuses if s != "PENDING"]
        if not started:
            status = "PENDING"
        elif isinstance(node, (Route, Race)) or all(s != "PENDING" for s in child_statuses):
            status = _merge(started)
        else:
            status = _merge(started + ["RUNNING"]) if active else _merge(started)
    out[path] = status
    return status


# Containers whose children all run when the container runs; a route, race, fallback, map
# (of maybe no items), flow or dispatch runs some of them only, or records each of its own.
_RUNS_ALL = (Seq, Parallel, Loop, Timeout, Limit)


def _ran(node: Node, path: str, out: dict[str, str]) -> None:
    """``node`` ran to its end: it and whatever inside it had to run with it, shown PENDING
    for lack of a record of its own, are SUCCESS."""
    if out.get(path, "PENDING") == "PENDING":
        out[path] = "SUCCESS"
    if isinstance(node, _RUNS_ALL):
        for i, c in enumerate(node.children()):
            _ran(c, f"{path}.{i}", out)


def _mark_running(node: Node, path: str, out: dict[str, str]) -> None:
    """Mark the node in flight and, inside it, the first node that has not finished."""
    out[path] = "RUNNING"
    if isinstance(node, Seq):
        kids = [(f"{path}.{i}", c) for i, c in enumerate(node.children())]
        for p, c in kids:
            if out.get(p, "PENDING") == "PENDING":
                _mark_running(c, p, out)
                return
    elif not isinstance(node, (Route, Dispatch)):
        for i, c in enumerate(node.children()):
            p = f"{path}.{i}"
            if out.get(p, "PENDING") == "PENDING":
                _mark_running(c, p, out)


def one_line_gates(nodes: list[NodeRecord], run_status: str) -> list[NodeRecord]:
    """``nodes`` (and, copied, their children) with each gate as one record: its decision,
    at the path of its own step, lasting from its request to its answer. A gate still
    marked waiting under a finished run was never answered."""
    gates = {n.name: replace(n) for n in nodes if n.kind == "gate"}
    out = []
    for n in nodes:
        gate = gates.get(n.name)
        if n.kind == "gate" and gate is not None:
            continue
        if n.kind == "step" and gate is not None and gate.path is None:
            gate.path, gate.started_ms, gate.duration_ms = n.path, n.started_ms, n.duration_ms
            continue
        out.append(replace(n, children=one_line_gates(n.children, run_status)) if n.children else n)
    for g in gates.values():
        asked, decided = g.detail.get("requested_at"), g.detail.get("decided_at")
        if isinstance(asked, int):
            g.started_ms = g.started_ms if g.started_ms is not None else asked
            g.duration_ms = max(decided - g.started_ms, 0) if isinstance(decided, int) else None
        if g.status == "WAITING" and run_status not in ACTIVE_RUN:
            g.status = "UNANSWERED"
        out.append(g)
    out.sort(key=lambda n: (path_key(n.path), n.started_ms or 0))
    return out


def task_note(rec: NodeRecord) -> str:
    """``task seo: joined``; a task that ended but no join has collected yet says so."""
    status = rec.detail.get("task_status")
    if not status:
        return ""
    if status == "running" and rec.status not in ACTIVE_RUN:
        status = f"{rec.status.lower()}, not joined yet"
    return f"task {rec.detail.get('task')}: {status}"


def wait_bars(events: list[Any], now_ms: int) -> list[dict[str, Any]]:
    """Timeline bars of the joins and sleeps of a run from their start and end events
    (:meth:`EventReader.waits`); one still waiting lasts until ``now_ms``."""
    bars: dict[str, dict[str, Any]] = {}
    for ev in events:
        key = ev.path or ""
        kind = ev.kind or ""
        if ev.type.value == "node_started":
            bars[key] = {"path": ev.path, "name": ev.name or kind, "kind": kind, "status": "RUNNING",
                         "start_ms": int(ev.at * 1000), "end_ms": now_ms, "depth": 0}
        elif key in bars:
            bars[key]["status"] = "SUCCESS" if ev.type.value == "node_finished" else "ERROR"
            bars[key]["end_ms"] = max(int(ev.at * 1000), bars[key]["start_ms"])
    return list(bars.values())


def timeline(tree: RunTree, now_ms: int, waits: list[dict[str, Any]] | None = None
             ) -> tuple[int, int, list[dict[str, Any]]]:
    """The run's start, its end (``now_ms`` while active) and one bar per recorded
    operation with a start time; a gate's bar runs from its request to its answer (to now
    while it waits), and ``waits`` (:func:`wait_bars`) add the joins and sleeps, in path
    order: ``{path, name, kind, status, start_ms, end_ms, depth}``."""
    t0 = tree.run.created_ms or now_ms
    end = t0 + tree.run.duration_ms if tree.run.duration_ms is not None else now_ms
    bars: list[dict[str, Any]] = []

    def add(records: list[NodeRecord], depth: int) -> None:
        for rec in records:
            if rec.started_ms is None or rec.kind == "dbos-op":
                add(rec.children, depth + 1)
                continue
            stop = rec.started_ms + (rec.duration_ms or 0)
            if rec.kind == "gate" and rec.status == "WAITING":
                stop = now_ms
            bars.append({"path": rec.path, "name": f"gate {rec.name}" if rec.kind == "gate" else rec.name,
                         "kind": rec.kind, "status": rec.status, "start_ms": rec.started_ms,
                         "end_ms": max(stop, rec.started_ms), "depth": depth})
            add(rec.children, depth + 1)

    add(one_line_gates(tree.nodes, tree.run.status), 0)
    for w in sorted(waits or [], key=lambda b: path_key(b["path"])):
        if tree.run.status not in ACTIVE_RUN and w["status"] == "RUNNING":
            w = {**w, "status": "CANCELLED" if tree.run.status == "CANCELLED" else "ERROR",
                 "end_ms": w["start_ms"]}
        at = next((i for i, b in enumerate(bars) if b["depth"] == 0 and b["path"] is not None
                   and path_key(b["path"]) > path_key(w["path"])), len(bars))
        bars.insert(at, w)
    end = max([end, *(b["end_ms"] for b in bars)])
    return t0, end, bars


__all__ = ["base_path", "node_statuses", "one_line_gates", "recorded_statuses", "task_note", "timeline",
           "wait_bars"]
