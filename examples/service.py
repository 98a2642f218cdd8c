"""A FastAPI service embedding durapipe, built on the shipped router ``durapipe.fastapi``:
start runs, read their status and result, follow their events live (Server-Sent Events),
list the gates runs wait at, and approve or reject them as a person named by a bearer token.

    DURAPIPE_DATABASE_URL=postgresql://localhost/app DURAPIPE_SERVICE_TOKENS=s3cret=alice \\
        uvicorn examples.service:api           # or `dbos start` at the repo root

    curl -X POST localhost:8000/runs -H 'content-type: application/json' \\
         -d '{"pipeline": "publish", "inputs": {"topic": "durable AI"}, "run_id": "post-1"}'
    curl -N localhost:8000/runs/post-1/events          # live, until the run ends
    curl localhost:8000/runs/post-1/result
    # "reviewed" waits at the gate "legal" until a person answers
    curl -X POST localhost:8000/runs -H 'content-type: application/json' \\
         -d '{"pipeline": "reviewed", "inputs": {"topic": "durable AI"}, "run_id": "post-2"}'
    curl localhost:8000/gates
    curl -X POST localhost:8000/runs/post-2/gates/legal/approve \\
         -H 'authorization: Bearer s3cret' -H 'content-type: application/json' \\
         -d '{"comment": "ok"}'                                        # answered by alice

The durapipe App launches in the lifespan (recovering unfinished runs) and shuts down
with the server. ``create_service(app)`` serves any App.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from durapipe import Agent, App, FakeModel, fn, gate
from durapipe.fastapi import bearer_approver, durapipe_router, lifespan


def tokens_from_env() -> dict[str, str]:
    """``DURAPIPE_SERVICE_TOKENS=token=person,token2=person2``: who each bearer token is."""
    pairs = (p.partition("=") for p in os.environ.get("DURAPIPE_SERVICE_TOKENS", "").split(","))
    return {token.strip(): person.strip() for token, _, person in pairs if token and person}


def create_service(app: App, tokens: Mapping[str, str] | None = None) -> FastAPI:
    """A FastAPI app serving ``app``'s pipelines; ``tokens`` (token -> person, default from
    env ``DURAPIPE_SERVICE_TOKENS``) say who answers a gate."""
    api = FastAPI(title=f"durapipe: {app.name}", lifespan=lifespan(app))
    known = dict(tokens) if tokens is not None else tokens_from_env()
    api.include_router(durapipe_router(app, approver=bearer_approver(known) if known else None))
    return api


def _stamp(state: dict[str, Any]) -> dict[str, Any]:
    return {"published": True}


# The demo app: offline (FakeModel) so `dbos start` works without an API key.
demo = App("service-demo", model=FakeModel({"writer": lambda r: f"A post about {r.prompt}",
                                            "editor": "Ship it."}))
write = (Agent("writer").instruct("{topic}").writes("draft").stream_tokens()
         >> Agent("editor").instruct("Review: {draft}").writes("review"))
demo.pipeline("publish", write >> fn(_stamp))
demo.pipeline("reviewed", write >> gate("legal", "Publish {draft}?") >> fn(_stamp))
api = create_service(demo)


if __name__ == "__main__":  # what `dbos start` runs (see dbos-config.yaml)
    import uvicorn

    uvicorn.run(api, host=os.environ.get("DURAPIPE_SERVICE_HOST", "127.0.0.1"),
                port=int(os.environ.get("DURAPIPE_SERVICE_PORT", "8000")))
