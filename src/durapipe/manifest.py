"""Pipeline manifests and the compatibility of a run in flight with new code.

A manifest lists every node of a pipeline in walk order (parents first) with its path,
kind, name, the state keys it reads and writes, and the hash of its subtree::

    >>> entries = manifest(writer >> gate("legal", "ok?") >> publisher)
    >>> entries[2]["path"], entries[2]["kind"], entries[2]["name"]
    ('0.1', 'gate', 'legal')

A run recorded by one shape may continue on another when replaying its history on the new
code gives the same operations: every node the run has passed or is inside is unchanged
(:func:`compare`). Nodes the run has not reached may change freely: a node added after a
gate, a prompt edited in a later agent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .ir import Agent, Fn, Gate, Node, Seq, Transform, template_keys

Manifest = list[dict[str, Any]]
_MARK_RE = re.compile(r"#\d+")
_STEP_RE = re.compile(r"^([0-9][0-9.#]*):")


def _reads_writes(node: Node) -> tuple[list[str] | None, list[str] | None]:
    if isinstance(node, Agent):
        return list(node.reads()), [node.key]
    if isinstance(node, (Fn, Transform)):
        return (list(node.reads) if node.reads is not None else None,
                list(node.writes) if node.writes is not None else None)
    if isinstance(node, Gate):
        return list(template_keys(node.message)), []
    return None, None


def _named_first(node: Node) -> bool:
    """True when the first DBOS operation of ``node`` is a step named by its path.

    Such a node leaves a row as soon as it has done anything, so a run with no row of it
    has not reached it.
    """
    if isinstance(node, (Fn, Agent)):
        return True
    if isinstance(node, Gate):
        return node.when is None
    if isinstance(node, Seq):
        for child in node.nodes:
            if not isinstance(child, Transform):
                return _named_first(child)
    return False


def manifest(root: Node) -> Manifest:
    """Every node of ``root`` in walk order: path, kind, name, reads, writes and tree hash."""
    out: Manifest = []
    for path, node in root.walk():
        reads, writes = _reads_writes(node)
        out.append({"path": path, "kind": node.kind, "name": node.label, "reads": reads,
                    "writes": writes, "tree": node.digest(), "named_first": _named_first(node)})
    return out


def base_path(path: str) -> str:
    """A node path without instance marks (``0.3.0#2`` -> ``0.3.0``)."""
    return _MARK_RE.sub("", path)


def step_path(function_name: str, child_workflow_id: str | None, root: str) -> str | None:
    """The node path a recorded operation of run ``root`` belongs to, or None when the
    operation does not name one (``DBOS.sleep``, ``DBOS.recv``, ``DBOS.getResult``, ...)."""
    if child_workflow_id and function_name != "DBOS.getResult":
        prefix = f"{root}/"
        if child_workflow_id.startswith(prefix):
            return base_path(child_workflow_id[len(prefix):].split(":", 1)[0])
        return None
    m = _STEP_RE.match(function_name)
    return base_path(m.group(1)) if m else None


@dataclass(frozen=True)
class Frontier:
    """Where a run's recorded history ends: the node paths of its path-named operations,
    and whether operations that name no node (sleep, recv, events) were recorded after them."""

    paths: tuple[str, ...]
    trailing: bool

    @classmethod
    def from_operations(cls, ops: list[tuple[int, str, str | None]], root: str) -> Frontier:
        """``ops``: ``(function_id, function_name, child_workflow_id)`` of run ``root``."""
        paths: list[str] = []
        last_named, last_any = -1, -1
        for fid, name, child in ops:
            last_any = max(last_any, fid)
            path = step_path(name, child, root)
            if path is not None:
                paths.append(path)
                last_named = max(last_named, fid)
        return cls(tuple(dict.fromkeys(paths)), last_any > last_named)

    def to_json(self) -> dict[str, Any]:
        return {"paths": list(self.paths), "trailing": self.trailing}


@dataclass(frozen=True)
class Verdict:
    """Whether a run may continue on new code; when not, the node that differs and why."""

    compatible: bool
    node: str | None = None
    reason: str = ""
    frontier: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"compatible": self.compatible, "node": self.node, "reason": self.reason,
                "frontier": self.frontier}


def _describe(entry: dict[str, Any] | None) -> str:
    return "nothing" if entry is None else f"{entry['kind']} {entry['name']!r}"


def _difference(old: dict[str, Any], new: dict[str, Any] | None) -> str:
    """What differs between two entries at one path, in words."""
    if new is None or (new["kind"], new["name"]) != (old["kind"], old["name"]):
        return f"it is now {_describe(new)}"
    for key in ("reads", "writes"):
        if old[key] != new[key]:
            return f"it {key} {new[key]} instead of {old[key]}"
    return "its settings or the nodes inside it differ"


def compare(old: Manifest, new: Manifest, frontier: Frontier, path: str = "0") -> Verdict:
    """May a run recorded by ``old`` and stopped at ``frontier`` continue on ``new``?

    ``path`` is the node a workflow runs: ``0`` for a run, a subtree for a child workflow
    (which must be unchanged as a whole). For a run, every node up to the frontier in
    walk order must be unchanged, except that a sequence the run is inside may gain,
    lose or change nodes after the frontier. Operations that name no node after the last
    named one extend the frontier over the following nodes whose first operation would
    not be named (a sleep, a join), so an unnamed record is never matched to new code.
    """
    olds = {e["path"]: e for e in old}
    news = {e["path"]: e for e in new}
    if path != "0":
        o, n = olds.get(base_path(path)), news.get(base_path(path))
        if o is not None and n is not None and o["tree"] == n["tree"]:
            return Verdict(True, frontier=path)
        return Verdict(False, base_path(path), f"the subtree at {path} changed: it was "
                       f"{_describe(o)} and is now {_describe(n)}", path)
    index = {e["path"]: i for i, e in enumerate(old)}
    for p in frontier.paths:
        if p not in index:
            return Verdict(False, p, f"the run recorded node {p}, which its own manifest "
                           "does not have", p)
    last = max((index[p] for p in frontier.paths), default=-1)
    if frontier.trailing:
        while last + 1 < len(old) and not old[last + 1]["named_first"]:
            last += 1
    if last < 0:
        return Verdict(True)
    at = old[last]["path"]
    for entry in old[: last + 1]:
        p, now = entry["path"], news.get(entry["path"])
        inside = at.startswith(p + ".")
        if inside and entry["kind"] == "seq":
            if now is None or now["kind"] != "seq":
                return Verdict(False, p, f"the sequence at {p}, which the run is inside, "
                               f"is now {_describe(now)}", at)
            continue
        if now is None or now["tree"] != entry["tree"]:
            where = "is inside" if inside else "has reached" if p == at else "already passed"
            return Verdict(False, p, f"node {p} ({_describe(entry)}), which the run {where}, "
                           f"changed: {_difference(entry, now)}", at)
    return Verdict(True, frontier=at)
