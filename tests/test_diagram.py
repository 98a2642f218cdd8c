"""Pipeline diagrams: every example pipeline's Mermaid chart against its IR, every node kind
drawn with its own shape, run statuses colouring boxes, and `durapipe graph`."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from xml.etree import ElementTree

import pytest
from typer.testing import CliRunner

from durapipe import (
    Agent,
    Flow,
    Step,
    dispatch,
    fn,
    gate,
    join,
    map_over,
    race,
    route,
    sleep,
    transform,
    until,
)
from durapipe.cli import cli
from durapipe.diagram import drawn_paths, mermaid, node_id
from durapipe.diagram_svg import svg
from durapipe.ir import Dispatch, Join, Node, Seq

EXAMPLES = Path(__file__).parents[1] / "examples"
EDGE = re.compile(r"^\s*(\w+) (-->|-\.->)(?:\|([^|]*)\|)? (\w+)$")
BOX = re.compile(r"^\s*(n[\d_]+)[\[({>]")
SUBGRAPH = re.compile(r"^\s*subgraph (n[\d_]+)\[")


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def example_pipelines() -> list[tuple[str, Node]]:
    blog = load("blog_publishing")
    service = load("service").demo
    return ([("demo", load("demo").pipeline), ("onboarding", load("onboarding").onboarding)]
            + [(f"blog:{k}", v) for k, v in blog.PATTERNS.items()]
            + [(f"service:{k}", service.registered(k).node) for k in sorted(service.pipelines)])


def parse(text: str) -> tuple[set[str], dict[tuple[str, str], tuple[str, str | None]]]:
    ids: set[str] = set()
    edges: dict[tuple[str, str], tuple[str, str | None]] = {}
    for line in text.splitlines():
        if m := EDGE.match(line):
            edges[(m.group(1), m.group(4))] = (m.group(2), m.group(3))
        elif m := BOX.match(line) or SUBGRAPH.match(line):
            ids.add(m.group(1))
    return ids, edges


def first_leaf(path: str, node: Node) -> str:
    """The box an edge into ``node`` reaches when ``node`` starts with a single leaf."""
    while isinstance(node, Seq):
        path, node = f"{path}.0", node.nodes[0]
    return path


def last_leaf(path: str, node: Node) -> str:
    while isinstance(node, Seq):
        path, node = f"{path}.{len(node.nodes) - 1}", node.nodes[-1]
    return path


def reachable(edges: dict[tuple[str, str], tuple[str, str | None]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        cur = todo.pop()
        for (a, b) in edges:
            if a == cur and b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


@pytest.mark.parametrize("name,node", example_pipelines(), ids=lambda v: v if isinstance(v, str) else "")
def test_example_diagram_matches_ir(name: str, node: Node) -> None:
    text = mermaid(node)
    ids, edges = parse(text)
    # every node of the IR that runs has its box (or subgraph), named by its path
    for path in drawn_paths(node):
        assert node_id(path) in ids, f"{name}: node {path} missing from\n{text}"
    assert reachable(edges, "start") >= ids - {i for i in ids if text.count(f"subgraph {i}[")}
    assert "finish" in reachable(edges, "start")
    # durapipe's own SVG (graph --format svg without mmdc) draws the same nodes
    picture = ElementTree.fromstring(svg(node))
    drawn = {g.get("data-path") for g in picture.iter("{http://www.w3.org/2000/svg}g")}
    assert set(drawn_paths(node)) <= drawn, f"{name}: {set(drawn_paths(node)) - drawn} missing from the SVG"
    joined: dict[str, list[str]] = {}
    for path, n in node.walk():
        if isinstance(n, Seq):  # a sequence links each node to the next, in order
            for i in range(len(n.nodes) - 1):
                a, b = n.nodes[i], n.nodes[i + 1]
                src, dst = last_leaf(f"{path}.{i}", a), first_leaf(f"{path}.{i + 1}", b)
                if not a.children() and not b.children():
                    assert edges.get((node_id(src), node_id(dst)), ("",))[0] == "-->", (src, dst)
        if isinstance(n, Dispatch):  # tasks hang off the dispatch by dotted edges
            for i, task in enumerate(n.names):
                entry = node_id(first_leaf(f"{path}.{i}", n.tasks[i]))
                assert edges[(node_id(path), entry)] == ("-.->", f"task {task}")
                joined[task] = [node_id(last_leaf(f"{path}.{i}", n.tasks[i]))]
        if isinstance(n, Join):  # a join collects exactly the tasks it names (all when none)
            names = n.names or tuple(joined)
            for task in names:
                for exit_id in joined.pop(task, []):
                    assert edges[(exit_id, node_id(path))][0] == "-.->", (task, path)


def test_demo_diagram_edges_exactly() -> None:
    _, edges = parse(mermaid(load("demo").pipeline))
    solid = {k for k, (arrow, _) in edges.items() if arrow == "-->"}
    dotted = {k: label for k, (arrow, label) in edges.items() if arrow == "-.->"}
    assert solid == {("start", "n0_0"), ("n0_0", "n0_1"), ("n0_1", "n0_2"), ("n0_2", "n0_3"),
                     ("n0_3", "n0_4"), ("n0_4", "n0_5"), ("n0_5", "finish")}
    assert dotted == {("n0_1", "n0_1_0"): "task email", ("n0_1", "n0_1_1"): "task seo",
                      ("n0_1_1", "n0_3"): None, ("n0_1_0", "n0_5"): None}


def test_every_kind_has_its_own_shape() -> None:
    a, b, c = (Agent(x).instruct("{topic}").writes(x) for x in "abc")
    flow = Flow(goals=["z"], steps=[Step("y", fn(lambda s: {"y": 1}, name="make_y"), outputs=["y"]),
                                    Step("z", fn(lambda s: {"z": 1}, name="make_z"), needs=["y"],
                                         outputs=["z"])])
    node = (transform(lambda s: {}, name="prep") >> (a | b) >> race(a, c) >> (a // b)
            >> (c * 3) >> (a * until(lambda s: True, max=4))
            >> route("kind", {"x": a, "y": b}, default=c) >> a.timeout(5)
            >> map_over("items", fn(lambda s: {}, name="each"), "outs")
            >> gate("legal", "ok?", approvers=["alice"]) >> sleep(2) >> flow)
    text = mermaid(node)
    for fragment in ('n0_0[/"prep"/]', 'subgraph n0_1["parallel: all branches"]',
                     'subgraph n0_2["race: first success wins"]',
                     'subgraph n0_3["fallback: first success"]', 'n0_3_0 -.->|on error| n0_3_1',
                     'subgraph n0_4["loop ×3"]', "n0_4_0 -.->|again| n0_4_0",
                     '(max 4)"]', 'n0_6{"route: kind"}', "n0_6 -->|'x'| n0_6_0",
                     "n0_6 -->|default| n0_6_2", 'subgraph n0_7["timeout 5s"]',
                     'subgraph n0_8["map over items → outs"]', 'n0_8_0("each")',
                     'n0_9{{"gate: legal · alice"}}', 'n0_10(["sleep 2s"])',
                     'subgraph n0_11["flow: goals z"]', "n0_11_0_0 -->|y| n0_11_1_0", 'n0_11_1_0("z")',
                     'n0_1_0["a<br/><small>agent</small>"]'):
        assert fragment in text, f"{fragment!r} not in\n{text}"
    # the route's three branches all lead on to the timeout's agent
    _, edges = parse(text)
    for branch in ("n0_6_0", "n0_6_1", "n0_6_2"):
        assert (branch, "n0_7_0") in edges


def test_dispatch_join_shapes_and_quotes_escaped() -> None:
    tricky = Agent('say "hi" <b>').instruct("{topic}").writes("x")
    text = mermaid(dispatch(tricky, names=["t"]) >> join("t", timeout=3))
    assert 'n0_0>"dispatch: t"]' in text and 'n0_1[/"join: t (≤3s)"\\]' in text
    assert "say &quot;hi&quot; &lt;b&gt;" in text and '"hi"' not in text


def test_statuses_colour_boxes() -> None:
    text = mermaid(load("demo").pipeline, {"0.0": "SUCCESS", "0.2": "RUNNING", "0.3": "ERROR",
                                           "0.1.1": "SUCCESS"})
    assert "class n0_0,n0_1_1 success" in text
    assert "class n0_2 running" in text and "class n0_3 error" in text
    assert "classDef success fill:" in text


def test_graph_command_prints_the_registered_pipeline() -> None:
    result = CliRunner().invoke(cli, ["graph", f"{EXAMPLES / 'demo.py'}:publish"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("---\ntitle: publish\n---\nflowchart TD")
    assert 'n0_0["content_writer' in result.output


def test_graph_images_without_mmdc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no mmdc, no chromium anywhere
    target = f"{EXAMPLES / 'demo.py'}:publish"
    drawn = CliRunner().invoke(cli, ["graph", target, "--format", "svg", "-o", str(tmp_path / "x.svg")])
    assert drawn.exit_code == 0 and "durapipe's SVG drawing" in drawn.output, drawn.output
    picture = ElementTree.parse(tmp_path / "x.svg").getroot()
    labels = "".join(picture.itertext())
    assert all(n in labels for n in ("content_writer", "dispatch (background): email, seo", "join seo"))
    refused = CliRunner().invoke(cli, ["graph", target, "--format", "png", "-o", str(tmp_path / "x.png")])
    assert refused.exit_code == 1 and "no renderer for --format png" in refused.output
    assert "chromium" in refused.output and not (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium") or bool(shutil.which("mmdc")), reason="needs chromium, no mmdc")
def test_graph_png_through_headless_chromium(tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    done = CliRunner().invoke(cli, ["graph", f"{EXAMPLES / 'demo.py'}:publish", "--format", "png", "-o", str(out)])
    assert done.exit_code == 0 and "photographed by headless Chromium" in done.output, done.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
