"""OpenTelemetry metrics (runs by status, node latency, tokens) and model/token attributes
on agent spans, with tracing on, read back from in-memory readers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from durapipe import Agent, App, FakeModel, NodeFailed, fn

READER = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))


def fetch(state: dict[str, Any]) -> dict[str, Any]:
    return {"doc": "a long source text"}


def publish(state: dict[str, Any]) -> dict[str, Any]:
    if state.get("fail"):
        raise ValueError("cms is down")
    return {"published": True}


def points(name: str) -> list[Any]:
    data = READER.get_metrics_data()
    assert data is not None
    return [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == name for p in m.data.data_points
            if (p.attributes or {}).get("durapipe.pipeline") == "metered"]


def test_runs_nodes_and_tokens_are_measured(make_app: Callable[..., App]) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = make_app("metered-app", model=FakeModel({"writer": "a draft of four words"}), tracing=provider)
    pipe = app.pipeline("metered", fn(fetch) >> Agent("writer").instruct("Write about {doc}").writes("draft")
                        >> fn(publish))
    with app:
        pipe.run({}, run_id="m-1")
        pipe.run({}, run_id="m-2")
        with pytest.raises(NodeFailed):
            pipe.run({"fail": True}, run_id="m-3")

    runs = {p.attributes["durapipe.status"]: p.value for p in points("durapipe.runs")}
    assert runs == {"SUCCESS": 2, "ERROR": 1}
    latency = {(p.attributes["durapipe.node_name"], p.attributes["durapipe.status"]): p.count
               for p in points("durapipe.node.duration")}
    assert latency[("fetch", "SUCCESS")] == 3 and latency[("writer", "SUCCESS")] == 3
    assert latency[("publish", "SUCCESS")] == 2 and latency[("publish", "ERROR")] == 1
    tokens = {p.attributes["gen_ai.token.type"]: p.value for p in points("durapipe.llm.tokens")}
    agent_spans = [s for s in exporter.get_finished_spans() if s.name == "agent writer"]
    assert len(agent_spans) == 3
    attrs = agent_spans[0].attributes or {}
    assert attrs["gen_ai.request.model"] == "fake"
    tin, tout = int(attrs["gen_ai.usage.input_tokens"]), int(attrs["gen_ai.usage.output_tokens"])  # type: ignore[arg-type]
    assert tin > 0 and tout > 0
    assert tokens == {"input": 3 * tin, "output": 3 * tout}
