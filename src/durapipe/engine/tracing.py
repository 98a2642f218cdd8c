"""OpenTelemetry spans for runs and nodes (the optional ``otel`` extra).

``App(..., tracing=True)`` emits spans through the global TracerProvider (configure it the
usual OpenTelemetry way); ``App(..., tracing=provider)`` uses that provider instead. Off by
default, and then nothing here runs: the interpreter checks one attribute per node and
``opentelemetry`` is never imported.

The spans follow the pipeline tree:

- ``durapipe.run`` for each execution of a run's workflow, ``durapipe.child_run`` for each
  execution of a child workflow (a dispatched task, a long parallel branch, a race entrant,
  a flow step). A child's span is a child of the span of the node that started it, also
  when the child is recovered in another process: the starting node's span context is
  stored with the child workflow (DBOS's ``PropagateOtelContext`` carrier) and read back.
- one span per node, named ``<kind> <name>`` (just ``<kind>`` for anonymous composites),
  a child of its parent node's span. Attributes: ``durapipe.run_id`` (the root run),
  ``durapipe.workflow_id``, ``durapipe.pipeline``, ``durapipe.node_path``,
  ``durapipe.node_name``, ``durapipe.node_kind``, ``durapipe.replayed``. A failed node's
  span has status ERROR and the exception recorded (once, on the span it came from).

Replay: DBOS resumes a run by executing its workflow again and answering every operation
that was recorded before from the record. Each execution emits its own spans, so a
resumed run has a second ``durapipe.run`` span (``durapipe.resumed = true``,
``durapipe.recorded_ops`` = how many operations were already recorded) with a node span
for every node it walks. A node all of whose operations were answered from the record
(nothing ran again) has ``durapipe.replayed = true`` and lasts about as long as reading
the record; count executions with ``durapipe.replayed = false``. A node that was in flight
at the crash, or that runs after it, is ``replayed = false``. The rule works on DBOS's
operation numbers: a node that starts at most one operation is replayed when that
operation's number was recorded; any other node when its last operation's number was.

With ``dbos_config={"enable_otlp": True, ...}`` DBOS adds its own workflow and step spans
(``dbos[otel]`` is needed for that); they nest under the durapipe node that is current.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dbos import DBOS, PropagateOtelContext
from dbos._context import extract_trace_context, get_local_dbos_context, otel_carrier_from_attributes
from dbos._dbos import _get_dbos_instance

from ..errors import AppStateError
from ..ir import Node
from ..state import State
from .reserve import single_op

if TYPE_CHECKING:
    from .context import Handler, RunContext

ATTR = "durapipe."


@dataclass
class _Frame:
    """The node span being executed, and whether anything under it ran for real."""

    span: Any
    fresh: bool = False
    input_tokens: int = 0
    output_tokens: int = 0


_frame: contextvars.ContextVar[_Frame | None] = contextvars.ContextVar("durapipe_trace_frame",
                                                                        default=None)


class Tracing:
    """Emits durapipe's spans through one OpenTelemetry tracer."""

    def __init__(self, provider: Any = None) -> None:
        try:
            from opentelemetry import context, trace
        except ImportError:
            raise AppStateError(
                "App(tracing=...) needs OpenTelemetry; install it with `pip install durapipe[otel]`"
            ) from None
        from opentelemetry import metrics

        self._trace = trace
        self._context = context
        self.tracer = trace.get_tracer("durapipe", tracer_provider=provider)
        meter = metrics.get_meter("durapipe")
        self.runs = meter.create_counter(
            "durapipe.runs", unit="{run}", description="Run executions that ended, by pipeline and status")
        self.node_duration = meter.create_histogram(
            "durapipe.node.duration", unit="ms", description="Latency of nodes that ran (not replayed)")
        self.tokens = meter.create_counter(
            "durapipe.llm.tokens", unit="{token}", description="Model tokens by pipeline, agent, model and type")

    def propagate(self) -> Any:
        """Wrap a child workflow's start: store the current span's context with it."""
        return PropagateOtelContext()

    # -- one workflow execution ---------------------------------------------------------
    async def workflow(self, ctx: RunContext, path: str, body: Callable[[], Awaitable[State]]) -> State:
        """Run one execution of a run's (or child's) workflow under its span."""
        workflow_id = DBOS.workflow_id or ""
        sys_db = _get_dbos_instance()._sys_db
        steps = await asyncio.to_thread(sys_db.list_workflow_steps, workflow_id, load_output=False)
        ctx.recorded_ops = max((s["function_id"] for s in steps), default=0)
        parent = None
        if not self._trace.get_current_span().get_span_context().is_valid:
            # Not started from a live span (recovery, a queue): rejoin the trace of the node
            # that started it, stored with the workflow.
            status = await asyncio.to_thread(sys_db.get_workflow_status, workflow_id)
            carrier = otel_carrier_from_attributes(status.get("attributes") if status else None)
            parent = extract_trace_context(carrier) if carrier else None
        child = workflow_id != ctx.root
        attrs: dict[str, Any] = {
            ATTR + "run_id": ctx.root, ATTR + "workflow_id": workflow_id,
            ATTR + "pipeline": ctx.pipeline.name, ATTR + "pipeline_version": ctx.pipeline.version,
            ATTR + "node_path": path, ATTR + "resumed": ctx.recorded_ops > 0,
            ATTR + "recorded_ops": ctx.recorded_ops,
        }
        span = self.tracer.start_span("durapipe.child_run" if child else "durapipe.run",
                                      context=parent, attributes=attrs)
        if child:
            return await self._within(span, None, body)
        outcome = "ERROR"
        try:
            out = await self._within(span, None, body)
            outcome = "SUCCESS"
            return out
        except BaseException as exc:
            outcome = "CANCELLED" if "Cancel" in type(exc).__name__ else "ERROR"
            raise
        finally:
            self.runs.add(1, {ATTR + "pipeline": ctx.pipeline.name, ATTR + "status": outcome,
                              ATTR + "resumed": ctx.recorded_ops > 0})

    def model_call(self, ctx: RunContext, agent: str, response: Any) -> None:
        """Put a model answer's model and tokens on the agent's span; count fresh tokens."""
        frame = _frame.get()
        if frame is None:
            return
        frame.input_tokens += response.input_tokens
        frame.output_tokens += response.output_tokens
        frame.span.set_attribute("gen_ai.request.model", response.model)
        frame.span.set_attribute("gen_ai.response.model", response.model)
        frame.span.set_attribute("gen_ai.usage.input_tokens", frame.input_tokens)
        frame.span.set_attribute("gen_ai.usage.output_tokens", frame.output_tokens)
        dbos_ctx = get_local_dbos_context()
        if dbos_ctx is not None and dbos_ctx.function_id <= ctx.recorded_ops:
            return  # answered from the record: these tokens were counted when they were spent
        base = {ATTR + "pipeline": ctx.pipeline.name, ATTR + "agent": agent, "gen_ai.request.model": response.model}
        self.tokens.add(response.input_tokens, {**base, "gen_ai.token.type": "input"})
        self.tokens.add(response.output_tokens, {**base, "gen_ai.token.type": "output"})

    # -- one node -----------------------------------------------------------------------
    async def node(self, ctx: RunContext, node: Node, path: str, state: State, handler: Handler) -> State:
        """Run one node's handler under its span; mark it replayed when nothing ran again."""
        dbos_ctx = get_local_dbos_context()
        first = (dbos_ctx.function_id if dbos_ctx else 0) + 1
        name = node.label if node.label == node.kind else f"{node.kind} {node.label}"
        span = self.tracer.start_span(name, attributes={
            ATTR + "run_id": ctx.root, ATTR + "workflow_id": DBOS.workflow_id or "",
            ATTR + "pipeline": ctx.pipeline.name, ATTR + "node_path": path,
            ATTR + "node_name": node.label, ATTR + "node_kind": node.kind,
        })
        parent = _frame.get()
        frame = _Frame(span)

        def last_op() -> int:
            # Concurrent single-op siblings move the shared counter, so such a node's only
            # operation is the one it started first.
            if single_op(node) or dbos_ctx is None:
                return first
            return max(first, dbos_ctx.function_id)

        started = time.monotonic()
        failed = [True]

        def done() -> None:
            replayed = not frame.fresh and last_op() <= ctx.recorded_ops
            span.set_attribute(ATTR + "replayed", replayed)
            if not replayed and parent is not None:
                parent.fresh = True
            if not replayed:
                self.node_duration.record((time.monotonic() - started) * 1000, {
                    ATTR + "pipeline": ctx.pipeline.name, ATTR + "node_kind": node.kind,
                    ATTR + "node_name": node.label, ATTR + "status": "ERROR" if failed[0] else "SUCCESS"})

        async def run() -> State:
            out = await handler(ctx, node, path, state)
            failed[0] = False
            return out

        return await self._within(span, frame, run, done)

    async def _within(self, span: Any, frame: _Frame | None, body: Callable[[], Awaitable[State]],
                      done: Callable[[], None] | None = None) -> State:
        token = self._context.attach(self._trace.set_span_in_context(span))
        frame_token = _frame.set(frame)
        try:
            out = await body()
            span.set_status(self._trace.Status(self._trace.StatusCode.OK))
            return out
        except BaseException as exc:
            self._failed(span, exc)
            raise
        finally:
            if done is not None:
                done()
            _frame.reset(frame_token)
            self._context.detach(token)
            span.end()

    def _failed(self, span: Any, exc: BaseException) -> None:
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if not getattr(exc, "_durapipe_traced", False):
            span.record_exception(exc)
            try:
                exc._durapipe_traced = True  # type: ignore[attr-defined]
            except AttributeError:
                pass
