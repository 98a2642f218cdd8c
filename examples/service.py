"""A FastAPI service embedding durapipe: start runs, read their status and result, list the
gates runs wait at, and approve or reject them with a bearer token.

    DURAPIPE_DATABASE_URL=postgresql://localhost/app DURAPIPE_SERVICE_TOKEN=s3cret \\
        uvicorn examples.service:api           # or `dbos start` at the repo root

    curl -X POST localhost:8000/runs -H 'content-type: application/json' \\
         -d '{"pipeline": "publish", "inputs": {"topic": "durable AI"}, "run_id": "post-1"}'
    curl localhost:8000/runs/post-1
    curl -X POST localhost:8000/runs/post-1/gates/legal/approve \\
         -H 'authorization: Bearer s3cret' -d '{"by": "alice"}'

The durapipe App launches in the lifespan (recovering unfinished runs) and shuts down
with the server. ``create_service(app)`` serves any App.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

from durapipe import Agent, App, DurapipeError, FakeModel, Pipeline, RunStatus, fn
from durapipe.errors import BuildError, StateError, UnknownGate, UnknownRun


class StartRun(BaseModel):
    pipeline: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    run_id: str | None = None


class Decision(BaseModel):
    by: str
    comment: str | None = None


def create_service(app: App, token: str | None = None) -> FastAPI:
    """A FastAPI app serving ``app``'s pipelines; ``token`` (default: env
    ``DURAPIPE_SERVICE_TOKEN``) guards approvals."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with app:
            yield

    api = FastAPI(title=f"durapipe: {app.name}", lifespan=lifespan)

    def require_token(authorization: str | None = Header(default=None)) -> None:
        expected = token if token is not None else os.environ.get("DURAPIPE_SERVICE_TOKEN")
        if not expected:
            raise HTTPException(503, "approvals are disabled: set DURAPIPE_SERVICE_TOKEN")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "app": app.name, "pipelines": sorted(app.pipelines)}

    @api.post("/runs", status_code=202)
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

    @api.get("/runs/{run_id}")
    async def get_run(run_id: str) -> dict[str, Any]:
        try:
            handle = await app.get_run_async(run_id)
        except UnknownRun as exc:
            raise HTTPException(404, str(exc)) from None
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

    @api.get("/gates")
    async def pending_gates(run_id: str | None = None) -> list[dict[str, Any]]:
        gates = await asyncio.to_thread(app.pending, run_id)  # type: ignore[attr-defined]
        return [{"run_id": g.run_id, "gate": g.gate, "message": g.message,
                 "approvers": list(g.approvers or []), "requested_at": g.requested_at} for g in gates]

    async def decide(approve: bool, run_id: str, gate: str, body: Decision) -> dict[str, Any]:
        fn_ = app.approve if approve else app.reject  # type: ignore[attr-defined]
        try:
            await asyncio.to_thread(lambda: fn_(run_id, gate, by=body.by, comment=body.comment))
        except (UnknownRun, UnknownGate) as exc:
            raise HTTPException(404, str(exc)) from None
        except DurapipeError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"run_id": run_id, "gate": gate, "decision": "approved" if approve else "rejected",
                "by": body.by}

    @api.post("/runs/{run_id}/gates/{gate}/approve", dependencies=[Depends(require_token)])
    async def approve(run_id: str, gate: str, body: Decision) -> dict[str, Any]:
        return await decide(True, run_id, gate, body)

    @api.post("/runs/{run_id}/gates/{gate}/reject", dependencies=[Depends(require_token)])
    async def reject(run_id: str, gate: str, body: Decision) -> dict[str, Any]:
        return await decide(False, run_id, gate, body)

    return api


def _stamp(state: dict[str, Any]) -> dict[str, Any]:
    return {"published": True}


# The demo app: offline (FakeModel) so `dbos start` works without an API key.
demo = App("service-demo", model=FakeModel({"writer": lambda r: f"A post about {r.prompt}",
                                            "editor": "Ship it."}))
demo.pipeline("publish", Agent("writer").instruct("{topic}").writes("draft")
              >> Agent("editor").instruct("Review: {draft}").writes("review") >> fn(_stamp))
api = create_service(demo)


if __name__ == "__main__":  # what `dbos start` runs (see dbos-config.yaml)
    import uvicorn

    uvicorn.run(api, host=os.environ.get("DURAPIPE_SERVICE_HOST", "127.0.0.1"),
                port=int(os.environ.get("DURAPIPE_SERVICE_PORT", "8000")))
