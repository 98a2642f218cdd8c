"""Pipeline diagrams: a Mermaid flowchart of any pipeline, node kinds drawn distinctly.

>>> print(mermaid(writer >> dispatch(email, seo, names=["email", "seo"]) >> join()))

Every node that runs has one box whose Mermaid id is derived from its path (``0.2`` ->
``n0_2``), so a run's recorded statuses colour the same boxes (``statuses={"0.2": "SUCCESS"}``).
Shapes: agent ``[rectangle]``, function ``(rounded)``, transform ``[/parallelogram/]``,
sleep ``([stadium])``, gate ``{{hexagon}}``, route ``{rhombus}``, dispatch ``>flag]``,
join ``[/trapezoid\\]``. Composites are labelled subgraphs: parallel (all branches),
race (first success), fallback (dotted "on error" edges between attempts), loop (a dotted
back edge), timeout, map and flow (steps linked by the keys they need). Background tasks
hang off their dispatch by dotted edges and feed the join that collects them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .bestof import BestOf
from .errors import OperatorError
from .ir import (
    Agent,
    Dispatch,
    Fallback,
    Fn,
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
    Sleep,
    Timeout,
    Transform,
    callable_name,
)
from .planner import Flow, Step
from .retry import policy_of

STATUS_CLASSES = {
    "SUCCESS": "success", "APPROVED": "success", "ERROR": "error", "REJECTED": "error",
    "TIMED_OUT": "error", "RUNNING": "running", "PENDING": "running", "ENQUEUED": "running",
    "WAITING": "waiting", "CANCELLED": "cancelled",
}
_CLASS_DEFS = {
    "success": "fill:#d3f9d8,stroke:#2b8a3e",
    "error": "fill:#ffe3e3,stroke:#c92a2a",
    "running": "fill:#d0ebff,stroke:#1864ab",
    "waiting": "fill:#f3d9fa,stroke:#862e9c",
    "cancelled": "fill:#fff3bf,stroke:#e67700",
}


def node_id(path: str) -> str:
    """The Mermaid id of the node at ``path``."""
    return "n" + path.replace(".", "_")


def _text(s: str) -> str:
    """A label inside Mermaid quotes: quotes and angle brackets as entities."""
    return (s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
            .replace(">", "&gt;"))


def _seconds(s: float) -> str:
    return f"{s:g}s"


@dataclass
class _Drawing:
    lines: list[str] = field(default_factory=list)
    depth: int = 1
    tasks: list[tuple[str, list[str]]] = field(default_factory=list)  # (task name, exits)
    joined: set[str] = field(default_factory=set)

    def add(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def edge(self, srcs: list[str], dsts: list[str], arrow: str = "-->", label: str | None = None) -> None:
        for s in srcs:
            for d in dsts:
                self.add(f"{s} {arrow}|{_text(label)}| {d}" if label else f"{s} {arrow} {d}")


def _leaf(d: _Drawing, path: str, node: Node) -> tuple[list[str], list[str]]:
    nid = node_id(path)
    if isinstance(node, Agent):
        model = node.model_ref if isinstance(node.model_ref, str) else None
        sub = f"agent · {model}" if model else "agent"
        policy = policy_of(node)
        if policy is not None:
            sub += f" · retry ×{policy.attempts}"
        d.add(f'{nid}["{_text(node.name)}<br/><small>{_text(sub)}</small>"]')
    elif isinstance(node, Fn):
        policy = policy_of(node)
        retry = f" · retry ×{policy.attempts}" if policy is not None else ""
        d.add(f'{nid}("{_text(node.label + retry)}")')
    elif isinstance(node, Transform):
        d.add(f'{nid}[/"{_text(node.label)}"/]')
    elif isinstance(node, Sleep):
        d.add(f'{nid}(["sleep {_seconds(node.seconds)}"])')
    elif isinstance(node, Gate):
        extra = f" · {', '.join(node.approvers)}" if node.approvers else ""
        d.add(f'{nid}{{{{"gate: {_text(node.name)}{_text(extra)}"}}}}')
    else:  # a node kind added later draws as a plain box with its kind
        d.add(f'{nid}["{_text(node.label)} ({_text(node.kind)})"]')
    return [nid], [nid]


def _subgraph(d: _Drawing, path: str, title: str, body: list[tuple[str, Node]],
              joiner: str | None = None) -> tuple[list[str], list[str], list[tuple[list[str], list[str]]]]:
    """Draw ``body`` inside a labelled subgraph; ``joiner`` chains the parts in order."""
    d.add(f'subgraph {node_id(path)}["{_text(title)}"]')
    d.depth += 1
    parts = [_draw(d, p, n) for p, n in body]
    if joiner is not None:
        for (_, exits), (entries, _) in zip(parts, parts[1:], strict=False):
            d.edge(exits, entries, joiner)
    d.depth -= 1
    d.add("end")
    entries = [e for ent, _ in parts for e in ent]
    exits = [x for _, ex in parts for x in ex]
    return entries, exits, parts


def _kids(path: str, node: Node) -> list[tuple[str, Node]]:
    return [(f"{path}.{i}", c) for i, c in enumerate(node.children())]


def _draw(d: _Drawing, path: str, node: Node) -> tuple[list[str], list[str]]:
    """Draw ``node`` and return the ids an edge into it / out of it attaches to."""
    if isinstance(node, Seq):
        parts = [_draw(d, p, n) for p, n in _kids(path, node)]
        for (_, exits), (entries, _) in zip(parts, parts[1:], strict=False):
            d.edge(exits, entries)
        return parts[0][0], parts[-1][1]
    if isinstance(node, (Parallel, Race)):
        title = "parallel: all branches" if isinstance(node, Parallel) else "race: first success wins"
        if isinstance(node, Parallel) and node.errors == "collect":
            title += f", failures → {node.errors_key or 'errors'}"
        entries, exits, _ = _subgraph(d, path, title, _kids(path, node))
        return entries, exits
    if isinstance(node, Fallback):
        entries, exits, parts = _subgraph(d, path, "fallback: first success", _kids(path, node))
        for (_, ex), (ent, _) in zip(parts, parts[1:], strict=False):
            d.edge(ex, ent, "-.->", "on error")
        return parts[0][0], exits
    if isinstance(node, Loop):
        title = (f"loop ×{node.times}" if node.until is None else
                 f"loop until {callable_name(node.until.pred).rsplit(':', 1)[-1]} (max {node.until.max})")
        entries, exits, _ = _subgraph(d, path, title, _kids(path, node))
        d.edge(exits, entries, "-.->", "again")
        return entries, exits
    if isinstance(node, Timeout):
        entries, exits, _ = _subgraph(d, path, f"timeout {_seconds(node.seconds)}", _kids(path, node))
        return entries, exits
    if isinstance(node, Limit):
        how = ", adaptive" if node.adaptive else ""
        entries, exits, _ = _subgraph(d, path, f"limit {node.key}: {node.n} at once{how}",
                                      _kids(path, node))
        return entries, exits
    if isinstance(node, MapOver):
        limit = f", {node.concurrency} at a time" if node.concurrency else ""
        title = f"map over {node.items_key} → {node.output_key}{limit}"
        if node.errors == "collect":
            title += f", failures → {node.failures_key}"
        entries, exits, _ = _subgraph(d, path, title, _kids(path, node))
        return entries, exits
    if isinstance(node, BestOf):
        score = callable_name(node.score).rsplit(":", 1)[-1]
        entries, exits, _ = _subgraph(d, path, f"best of {node.n} by {score}", _kids(path, node))
        return entries, exits
    if isinstance(node, Route):
        nid = node_id(path)
        selector = node.selector if isinstance(node.selector, str) else \
            callable_name(node.selector).rsplit(":", 1)[-1]
        d.add(f'{nid}{{"route: {_text(selector)}"}}')
        labels = [repr(v) for v, _ in node.branches] + (["default"] if node.default is not None else [])
        exits = []
        for label, (p, child) in zip(labels, _kids(path, node), strict=True):
            ent, ex = _draw(d, p, child)
            d.edge([nid], ent, "-->", label)
            exits.extend(ex)
        if node.default is None:
            exits.append(nid)  # no branch matched: the route passes through
        return [nid], exits
    if isinstance(node, Dispatch):
        nid = node_id(path)
        detached = " (detached)" if node.detach else ""
        d.add(f'{nid}>"dispatch: {_text(", ".join(node.names))}{detached}"]')
        for name, (p, child) in zip(node.names, _kids(path, node), strict=True):
            ent, ex = _draw(d, p, child)
            d.edge([nid], ent, "-.->", f"task {name}{detached}")
            if not node.detach:  # a detached task is never joined
                d.tasks.append((name, ex))
        return [nid], [nid]
    if isinstance(node, Join):
        nid = node_id(path)
        names = list(node.names) or [n for n, _ in d.tasks if n not in d.joined]
        wait = f" (≤{_seconds(node.timeout_seconds)})" if node.timeout_seconds else ""
        d.add(f'{nid}[/"join: {_text(", ".join(node.names) or "all")}{wait}"\\]')
        for name, exits in d.tasks:
            if name in names and name not in d.joined:
                d.edge(exits, [nid], "-.->")
        d.joined.update(names)
        return [nid], [nid]
    if isinstance(node, Flow):
        return _flow(d, path, node)
    if isinstance(node, Step):
        if isinstance(node.node, (Fn, Transform)):  # a function step is named by the flow
            d.add(f'{node_id(path + ".0")}("{_text(node.name)}")')
            return [node_id(path + ".0")], [node_id(path + ".0")]
        return _draw(d, f"{path}.0", node.node)
    return _leaf(d, path, node)


def _flow(d: _Drawing, path: str, flow: Flow) -> tuple[list[str], list[str]]:
    """A flow's steps linked by the keys they need, as the planner's own diagram links them."""
    d.add(f'subgraph {node_id(path)}["flow: goals {_text(", ".join(flow.goals))}"]')
    d.depth += 1
    drawn = [_draw(d, f"{path}.{i}", s) for i, s in enumerate(flow.steps)]
    entries: list[str] = []
    fed: set[int] = set()
    for i, step in enumerate(flow.steps):
        inner = [flow.producer(k) for k in step.needs]
        if all(j is None for j in inner):
            entries.extend(drawn[i][0])
        for k, j in zip(step.needs, inner, strict=True):
            if j is not None:
                d.edge(drawn[j][1], drawn[i][0], "-->", k)
                fed.add(j)
    d.depth -= 1
    d.add("end")
    goal_steps = [i for i, s in enumerate(flow.steps)
                  if s.name in flow.goals or set(s.outputs) & set(flow.goals)]
    exits = [x for i in (goal_steps or range(len(flow.steps))) for x in drawn[i][1]]
    return entries, exits


def mermaid(node: Node, statuses: dict[str, str] | None = None, title: str | None = None) -> str:
    """A Mermaid flowchart of ``node``; ``statuses`` maps node paths to a run's statuses
    (``SUCCESS``, ``ERROR``, ``RUNNING``, ``WAITING``, ...) to colour their boxes."""
    d = _Drawing()
    head = [f"---\ntitle: {_text(title)}\n---"] if title else []
    d.add('start(("start"))')
    entries, exits = _draw(d, "0", node)
    d.add('finish(("end"))')
    d.edge(["start"], entries)
    d.edge(exits, ["finish"])
    if statuses:
        used: dict[str, list[str]] = {}
        for path, status in sorted(statuses.items()):
            cls = STATUS_CLASSES.get(status.upper())
            if cls:
                used.setdefault(cls, []).append(node_id(path))
        for cls, ids in used.items():
            d.add(f"classDef {cls} {_CLASS_DEFS[cls]}")
            d.add(f"class {','.join(ids)} {cls}")
    return "\n".join([*head, "flowchart TD", *d.lines])


def drawn_paths(node: Node) -> list[str]:
    """Paths of the nodes that get a box of their own (leaves and the control nodes)."""
    out = []
    for path, n in node.walk():
        if isinstance(n, (Seq, Step)):
            continue
        out.append(path)
    return out


def render(text: str, fmt: str, out_path: str) -> None:
    """Write the diagram as ``fmt`` (svg or png) with Mermaid's own renderer, ``mmdc``.

    Raises :class:`OperatorError` naming the fix when ``mmdc`` is not installed."""
    import shutil
    import subprocess
    import tempfile

    exe = shutil.which("mmdc")
    if exe is None:
        raise OperatorError(
            f"no Mermaid renderer for --format {fmt}: install mermaid-cli (`npm i -g "
            "@mermaid-js/mermaid-cli`, which provides mmdc) or print the text and paste it into "
            "any Mermaid viewer"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".mmd", delete=False) as f:
        f.write(text)
    done = subprocess.run([exe, "-i", f.name, "-o", out_path, "-e", fmt],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OperatorError(f"mmdc failed to render {out_path!r}: {done.stderr.strip()[:300]}")


__all__ = ["STATUS_CLASSES", "drawn_paths", "mermaid", "node_id", "render"]
