"""OpenTelemetry spans per run and per node, on Postgres, read back from an in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbos import DBOS
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from durapipe import Agent, App, FakeModel, NodeFailed, dispatch, fn, join

MakeApp = Callable[..., App]
SIDE: list[str] = []


def fetch(state: dict[str, Any]) -> dict[str, Any]:
    SIDE.append("fetch")
    return {"doc": "text"}


def left(state: dict[str, Any]) -> dict[str, Any]:
    return {"left": 1}


def right_a(state: dict[str, Any]) -> dict[str, Any]:
    return {"ra": 1}


def right_b(state: dict[str, Any]) -> dict[str, Any]:
    return {"rb": 2}


def background(state: dict[str, Any]) -> dict[str, Any]:
    return {"bg": "done"}


def publish(state: dict[str, Any]) -> dict[str, Any]:
    SIDE.append("publish")
    if state.get("fail"):
        raise ValueError("cms is down")
    return {"published": True}


MODEL = FakeModel({"writer": "a draft"})
PIPELINE = (fn(fetch)
            >> Agent("writer").instruct("Write about {doc}").writes("draft")
            >> (fn(left) | (fn(right_a) >> fn(right_b)))
            >> dispatch(fn(background), names=["bg"])
            >> join("bg")
            >> fn(publish))


def exporter_app(make_app: MakeApp) -> tuple[App, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return make_app("traced", model=MODEL, tracing=provider), exporter


def by_path(spans: tuple[ReadableSpan, ...], run_id: str) -> dict[str, ReadableSpan]:
    out = {}
    for s in spans:
        attrs = s.attributes or {}
        if attrs.get("durapipe.run_id") == run_id and "durapipe.node_name" in attrs:
            out[str(attrs["durapipe.node_path"])] = s
    return out


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def sid(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def test_spans_follow_the_pipeline_tree(make_app: MakeApp) -> None:
    app, exporter = exporter_app(make_app)
    pipe = app.pipeline("post", PIPELINE)
    with app:
        assert pipe.run({}, run_id="t-1").state["published"] is True
    spans = exporter.get_finished_spans()
    runs = [s for s in spans if s.name == "durapipe.run"]
    assert len(runs) == 1
    run = runs[0]
    assert run.attributes is not None
    assert run.attributes["durapipe.run_id"] == "t-1"
    assert run.attributes["durapipe.pipeline"] == "post"
    assert run.attributes["durapipe.resumed"] is False
    assert run.status.status_code is StatusCode.OK

    nodes = by_path(spans, "t-1")
    assert {p: s.name for p, s in nodes.items()} == {
        "0": "seq",
        "0.0": "fn fetch", "0.1": "agent writer", "0.2": "parallel",
        "0.2.0": "fn left", "0.2.1": "seq", "0.2.1.0": "fn right_a", "0.2.1.1": "fn right_b",
        "0.3": "dispatch", "0.3.0": "fn background", "0.4": "join", "0.5": "fn publish",
    }
    for path, s in nodes.items():
        attrs = s.attributes or {}
        assert attrs["durapipe.pipeline"] == "post"
        assert attrs["durapipe.node_path"] == path
        assert attrs["durapipe.replayed"] is False
        assert s.context is not None and run.context is not None
        assert s.context.trace_id == run.context.trace_id  # children too: one trace per run
        assert s.status.status_code is StatusCode.OK
    assert nodes["0.1"].attributes is not None and nodes["0.1"].attributes["durapipe.node_name"] == "writer"
    assert parent_of(nodes["0"]) == sid(run)
    for child in ("0.0", "0.1", "0.2", "0.3", "0.4", "0.5"):
        assert parent_of(nodes[child]) == sid(nodes["0"])
    assert parent_of(nodes["0.2.0"]) == sid(nodes["0.2"])

    # The two-step branch runs as reserved steps of the run itself; the dispatched task runs
    # as a child workflow whose span hangs under the node that started it and names the run.
    children = {str((s.attributes or {})["durapipe.node_path"]): s
                for s in spans if s.name == "durapipe.child_run"}
    assert set(children) == {"0.3.0"}
    assert parent_of(children["0.3.0"]) == sid(nodes["0.3"])
    assert (children["0.3.0"].attributes or {})["durapipe.workflow_id"] == "t-1/0.3.0:bg"
    assert parent_of(nodes["0.2.1"]) == sid(nodes["0.2"])
    assert parent_of(nodes["0.2.1.0"]) == sid(nodes["0.2.1"])
    assert parent_of(nodes["0.3.0"]) == sid(children["0.3.0"])


def test_a_failed_node_has_an_error_span(make_app: MakeApp) -> None:
    app, exporter = exporter_app(make_app)
    pipe = app.pipeline("post", PIPELINE)
    with app:
        with pytest.raises(NodeFailed):
            pipe.run({"fail": True}, run_id="t-err")
    spans = exporter.get_finished_spans()
    nodes = by_path(spans, "t-err")
    failed = nodes["0.5"]
    assert failed.status.status_code is StatusCode.ERROR
    assert "cms is down" in (failed.status.description or "")
    assert [e.name for e in failed.events] == ["exception"]
    # Ancestors fail too, without a second copy of the exception event.
    for path in ("0",):
        assert nodes[path].status.status_code is StatusCode.ERROR
        assert nodes[path].events == ()
    run = next(s for s in spans if s.name == "durapipe.run")
    assert run.status.status_code is StatusCode.ERROR
    assert nodes["0.0"].status.status_code is StatusCode.OK


def test_a_resumed_execution_marks_replayed_nodes(make_app: MakeApp) -> None:
    """A fork re-executes the workflow with the first steps recorded: those nodes are replayed."""
    app, exporter = exporter_app(make_app)
    pipe = app.pipeline("post", fn(fetch) >> fn(left) >> fn(publish))
    with app:
        pipe.run({}, run_id="t-r")
        SIDE.clear()
        exporter.clear()
        forked = DBOS.fork_workflow("t-r", 3)  # re-run from the third step (publish)
        forked.get_result()
    assert SIDE == ["publish"]
    spans = exporter.get_finished_spans()
    run = next(s for s in spans if s.name == "durapipe.run")
    assert run.attributes is not None
    assert run.attributes["durapipe.resumed"] is True
    assert run.attributes["durapipe.recorded_ops"] == 2
    nodes = by_path(spans, forked.workflow_id)
    replayed = {p: (s.attributes or {})["durapipe.replayed"] for p, s in nodes.items()}
    assert replayed == {"0": False, "0.0": True, "0.1": True, "0.2": False}


def test_durapipe_runs_without_opentelemetry(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from durapipe import App, fn
        from durapipe.errors import AppStateError
        try:
            App("x-app", database_url="sqlite:///{tmp_path}/t.sqlite", tracing=True)
        except AppStateError as exc:
            assert "durapipe[otel]" in str(exc), exc
        else:
            raise SystemExit("tracing=True without opentelemetry must fail")
        app = App("no-otel", database_url="sqlite:///{tmp_path}/t.sqlite")
        p = app.pipeline("p", fn(lambda s: {{"x": 1}}, name="one"))
        with app:
            assert p.run({{}}).state == {{"x": 1}}
        assert not any(m.startswith("opentelemetry") for m in sys.modules), "imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")

