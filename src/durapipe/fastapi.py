"""Serve an App over HTTP with FastAPI: runs, results, gates and live event streams (SSE).

>>> from fastapi import FastAPI
>>> from durapipe.fastapi import bearer_approver, durapipe_router, lifespan
>>> api = FastAPI(lifespan=lifespan(app))                # launches the App with the server
>>> api.include_router(durapipe_router(app, approver=bearer_approver({"s3cret": "alice"})))

Endpoints (under ``prefix=``):

- ``POST /runs`` ``{"pipeline", "inputs", "run_id"}``: start a run (202); starting an
  existing run id returns that run.
- ``GET /runs/{id}``: status (and the state or the error once finished);
  ``GET /runs/{id}/result?timeout=30``: wait for the end (200 with the state; 409 with
  the error for a failed run; 202 while it still runs).
- ``GET /gates`` and ``GET /runs/{id}/gates``: the gates waiting for an answer.
- ``POST /runs/{id}/gates/{gate}/approve`` (or ``/reject``) ``{"comment"}``: the person
  answering is whoever the ``approver`` dependency says (a FastAPI dependency returning
  their name), never a field of the request. Without an approver, answers are refused.
- ``GET /runs/{id}/events``: the run's event stream as Server-Sent Events (``id:`` is the
  offset, ``event:`` the type, ``data:`` the event as JSON) until the run ends. A client
  that reconnects with ``Last-Event-ID`` (browsers' ``EventSource`` do) or
  ``?from_offset=`` gets exactly the events after it; ``?tokens=false`` leaves token
  chunks out.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from .engine.app import App
from .engine.eventread import EventType
from .engine.runs import Pipeline, RunHandle, RunStatus
from .errors import ApprovalRefused, BuildError, DurapipeError, StateError, UnknownGate, UnknownRun

__all__ = ["bearer_approver", "durapipe_router", "lifespan"]


class StartRun(BaseModel):
    pipeline: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    run_id: str | None = None


class Decision(BaseModel):
    comment: str | None = None


def lifespan(app: App) -> Callable[[FastAPI], Any]:
    """A FastAPI lifespan that launches ``app`` (recovering its runs) and stops it with the
    server; unfinished runs stay PENDING for the next start."""

    @asynccontextmanager
    async def run(_: FastAPI) -> AsyncIterator[None]:
        async with app:
            yield
    return run


def bearer_approver(tokens: Mapping[str, str]) -> Callable[..., str]:
    """An approver dependency: ``Authorization: Bearer <token>`` names the person, from
    ``tokens`` (token -> person). A missing or unknown token is a 401."""
    known = dict(tokens)

    def approver(authorization: str | None = Header(default=None)) -> str:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and given:
            for token, person in known.items():
                if hmac.compare_digest(given.encode(), token.encode()):
                    return person
        raise HTTPException(401, "missing or unknown bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return approver


def _no_approver() -> str:
    raise HTTPException(503, "gate answers are disabled: give durapipe_router(app, approver=...) "
                             "a dependency that returns the name of the person answering")


def _sse(event: Any) -> bytes:
    data = json.dumps(event.to_json(), separators=(",", ":"))
    return f"id: {event.offset}\nevent: {event.type.value}\ndata: {data}\n\n".encode()


def durapipe_router(app: App, *, approver: Callable[..., Any] | None = None,
                    prefix: str = "") -> APIRouter:
    """An APIRouter serving ``app``'s pipelines and runs (see the module docstring)."""
    router = APIRouter(prefix=prefix)
    person_of = Depends(approver or _no_approver)

    async def handle_of(run_id: str) -> RunHandle:
        try:
            handle = await app.get_run_async(run_id)
            await handle.status_async()
        except UnknownRun as exc:
            raise HTTPException(404, str(exc)) from None
        except DurapipeError as exc:
            raise HTTPException(422, str(exc)) from None
        return handle

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "app": app.name, "pipelines": sorted(app.pipelines)}

    @router.post("/runs", status_code=202)
    async def start_run(body: StartRun) -> dict[str, Any]:
        if body.pipeline not in app.pipelines:
            raise HTTPException(404, f"no pipeline {body.pipeline!r}; have {sorted(app.pipelines)}")
        pipeline = Pipeline(app, app.registered(body.pipeline))
        try:
            handle = await pipeline.start_async(body.inputs, run_id=body.run_id)
        except (StateError, BuildError) as exc:
            raise HTTPException(422, str(exc)) from None
        except DurapipeError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"run_id": handle.run_id, "status": (await handle.status_async()).value}

    @router.get("/runs/{run_id}")
    async def get_run(run_id: str) -> dict[str, Any]:
        handle = await handle_of(run_id)
        status = await handle.status_async()
        out: dict[str, Any] = {"run_id": run_id, "status": status.value}
        if status is RunStatus.SUCCESS:
            out["state"] = (await handle.result_async()).state
        elif status.finished:
            try:
                await handle.result_async()
            except DurapipeError as exc:
                out["error"] = str(exc)
        return out

    @router.get("/runs/{run_id}/result")
    async def get_result(run_id: str, timeout: float = Query(30.0, ge=0, le=3600)) -> Any:
        from fastapi.responses import JSONResponse

        handle = await handle_of(run_id)
        try:
            result = await handle.result_async(timeout=timeout)
        except TimeoutError:
            status = await handle.status_async()
            return JSONResponse({"run_id": run_id, "status": status.value}, status_code=202)
        except DurapipeError as exc:
            status = await handle.status_async()
            return JSONResponse({"run_id": run_id, "status": status.value, "error": str(exc)},
                                status_code=409)
        return {"run_id": run_id, "status": result.status.value, "state": result.state}

    def gates_json(found: list[Any]) -> list[dict[str, Any]]:
        return [{"run_id": g.run_id, "gate": g.gate, "message": g.message,
                 "approvers": list(g.approvers or []), "requested_at": g.requested_at}
                for g in found]

    @router.get("/gates")
    async def pending_gates() -> list[dict[str, Any]]:
        return gates_json(await app.pending_async())

    @router.get("/runs/{run_id}/gates")
    async def run_gates(run_id: str) -> list[dict[str, Any]]:
        await handle_of(run_id)
        return gates_json(await app.pending_async(run_id))

    async def decide(approve: bool, run_id: str, gate: str, body: Decision,
                     person: Any) -> dict[str, Any]:
        if not isinstance(person, str) or not person:
            raise HTTPException(500, f"the approver dependency returned {person!r}, not a name")
        answer = app.approve_async if approve else app.reject_async
        try:
            await answer(run_id, gate, by=person, comment=body.comment)
        except (UnknownRun, UnknownGate) as exc:
            raise HTTPException(404, str(exc)) from None
        except ApprovalRefused as exc:
            raise HTTPException(403, str(exc)) from None
        except DurapipeError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"run_id": run_id, "gate": gate, "by": person,
                "decision": "approved" if approve else "rejected"}

    @router.post("/runs/{run_id}/gates/{gate}/approve")
    async def approve(run_id: str, gate: str, body: Decision | None = None,
                      person: Any = person_of) -> dict[str, Any]:
        return await decide(True, run_id, gate, body or Decision(), person)

    @router.post("/runs/{run_id}/gates/{gate}/reject")
    async def reject(run_id: str, gate: str, body: Decision | None = None,
                     person: Any = person_of) -> dict[str, Any]:
        return await decide(False, run_id, gate, body or Decision(), person)

    @router.get("/runs/{run_id}/events")
    async def events(run_id: str, from_offset: int | None = Query(None, ge=0),
                     tokens: bool = True,
                     last_event_id: str | None = Header(default=None)) -> StreamingResponse:
        start = from_offset or 0
        if last_event_id is not None:
            try:
                start = int(last_event_id) + 1
            except ValueError:
                raise HTTPException(400, f"Last-Event-ID {last_event_id!r} is not an event "
                                         "offset (an int sent as the event's id)") from None
        handle = await handle_of(run_id)

        async def body() -> AsyncIterator[bytes]:
            async for event in handle.stream_async(start):
                if tokens or event.type is not EventType.TOKEN:
                    yield _sse(event)
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router
