"""The web console: an ASGI app (FastAPI) over one durapipe App's runs.

>>> console = create_console(app, token="s3cret")        # or auth=<a FastAPI dependency>
>>> with app:
...     uvicorn.run(console, host="127.0.0.1", port=8233)  # what `durapipe ui` does

Reading needs nothing; anything that changes a run (approve, reject, cancel, resume, fork)
needs an authenticated person. ``token`` (default: env ``DURAPIPE_UI_TOKEN``) is a
comma-separated list: ``alice:s3cret`` signs in as alice, a bare ``s3cret`` is a shared token
whose holder types the name they answer gates as. ``auth`` replaces tokens with the service's
own dependency, which returns the person's name or raises ``HTTPException``. Whether a person
may answer a gate is the gate's own ``approvers=`` check. Without tokens and ``auth``,
the console is read-only. The console needs only the database: it reads runs and answers
gates through a ``DBOSClient`` (``Admin``), so it serves whether or not ``app`` is launched
in its process (``durapipe ui`` never launches it, so it never recovers or runs anything).
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Form, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..audit import RunTree
from ..engine.admin import Admin, parse_since
from ..engine.app import App
from ..engine.eventread import EventReader, EventType, follow_async
from ..engine.scope import Owner, belongs_to
from ..errors import ApprovalRefused, DurapipeError, OperatorError, UnknownGate, UnknownRun
from ..runview import node_statuses, wait_bars
from . import pages
from .queries import RunFilter, list_page

COOKIE = "durapipe_ui"
Person = tuple[str | None, bool]  # (name, whether the name comes from the form)


def parse_tokens(spec: str | None) -> dict[str, str | None]:
    """``"alice:s1,bob:s2,shared"`` -> {secret: person or None for a shared token}."""
    out: dict[str, str | None] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, secret = item.partition(":")
        out[secret if sep else name] = name if sep else None
    return out


def local_path(target: str) -> str:
    """``target`` if it is a path on this server, else ``/``: no redirect leaves the console."""
    if target.startswith("/") and not target.startswith(("//", "/\\")) and "\\" not in target:
        return target
    return "/"


def _page(body: str, title: str, status: int = 200, note: str | None = None,
          person: str | None = None) -> HTMLResponse:
    return HTMLResponse(pages.layout(title, body, note=note, person=person), status_code=status)


def create_console(app: App, *, token: str | None = None,
                   auth: Callable[..., Any] | None = None, database_url: str | None = None,
                   page_size: int = 50, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The console for ``app``'s runs (see the module docstring). ``allowed_hosts`` refuses
    requests naming another host (``durapipe ui`` on 127.0.0.1 allows only local names, so
    a web page cannot reach the console through a rebound DNS name)."""
    tokens = parse_tokens(token if token is not None else os.environ.get("DURAPIPE_UI_TOKEN"))
    admin_box: list[Admin] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            while admin_box:
                admin_box.pop().close()

    api = FastAPI(title=f"durapipe console: {app.name}", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    if allowed_hosts:
        api.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    static = resources.files("durapipe.web").joinpath("static")
    api.mount("/static", StaticFiles(directory=str(static)), name="static")

    def admin() -> Admin:
        if not admin_box:
            admin_box.append(Admin(database_url or app.database_url))
        return admin_box[0]

    def token_person(request: Request) -> Person | None:
        given = request.cookies.get(COOKIE) or ""
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = bearer
        for secret, name in tokens.items():
            if given and hmac.compare_digest(given.encode(), secret.encode()):
                return (name, name is None)
        return None

    async def auth_person(name: Any = Depends(auth or (lambda: None))) -> Person:  # noqa: B008
        if not isinstance(name, str) or not name:
            raise HTTPException(401, "the console's auth dependency named nobody")
        return (name, False)

    def token_dep(request: Request) -> Person:
        if not tokens:
            raise HTTPException(403, "changes are disabled: start the console with DURAPIPE_UI_TOKEN "
                                     "set (or create_console(app, token=..., auth=...))")
        found = token_person(request)
        if found is None:
            raise HTTPException(401, "sign in first: changing a run needs a token",
                                headers={"WWW-Authenticate": "Bearer"})
        return found

    person: Callable[..., Any] = auth_person if auth is not None else token_dep

    def viewer(request: Request) -> str | None:
        found = token_person(request) if auth is None else None
        return found[0] if found else None

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
        title = {401: "Sign in needed", 403: "Refused", 404: "Not found"}.get(exc.status_code, "Error")
        ref = urlsplit(str(request.headers.get("referer") or "/"))
        back = local_path(ref.path + (f"?{ref.query}" if ref.query else ""))
        body = pages.message_page(title, str(exc.detail), back)
        if exc.status_code == 401:
            body += pages.login_page(back)
        return _page(body, title, exc.status_code)

    def fail(exc: DurapipeError) -> HTTPException:
        if isinstance(exc, UnknownRun):
            return HTTPException(404, str(exc))
        if isinstance(exc, ApprovalRefused):
            return HTTPException(403, str(exc))
        return HTTPException(409, str(exc))

    def owned(run_ids: list[str]) -> list[Any]:
        """The DBOS rows of those of ``run_ids`` that are runs of this console's app."""
        rows = admin().client.list_workflows(workflow_ids=run_ids, load_input=True,
                                             load_output=False) if run_ids else []
        return [r for r in rows if belongs_to(app.dbos_name, r)]

    def check_owned(run_id: str) -> list[Any]:
        """Refuse, as unknown, a run of another app sharing the database."""
        try:
            rows = owned([run_id])
        except DurapipeError as exc:
            raise fail(exc) from None
        if not rows:
            raise HTTPException(404, f"app {app.name!r} has no run with id {run_id!r}")
        return rows

    def load(run_id: str) -> tuple[RunTree, Any, Any]:
        rows = check_owned(run_id)
        try:
            tree = admin().tree(run_id)
        except DurapipeError as exc:
            raise fail(exc) from None
        args = (rows[0].input or {}).get("args") if rows and isinstance(rows[0].input, dict) else None
        node = None
        if tree.run.pipeline in app.pipelines:
            reg = app.registered(tree.run.pipeline)
            if not args or len(args) < 2 or args[1] == reg.version:
                node = reg.node
        return tree, node, (args[2] if args and len(args) > 2 else None)

    def outputs(tree: RunTree) -> dict[tuple[str, str], Any]:
        found: dict[tuple[str, str], Any] = {}
        ids = {tree.run.run_id} | {n.workflow_id for n in tree.walk() if n.workflow_id}
        for wid in sorted(ids):
            for step in admin().client.list_workflow_steps(wid):
                if step["output"] is not None and not step["child_workflow_id"]:
                    found[(wid, step["function_name"])] = step["output"]
        return found

    def live_html(run_id: str) -> tuple[str, RunTree, Any, Any]:
        tree, node, inputs = load(run_id)
        now = int(time.time() * 1000)
        statuses = node_statuses(node, tree) if node is not None else {}
        gates = admin().waiting_gates(run_id) if tree.run.status in pages.ACTIVE else []
        with EventReader(admin().url) as reader:
            waits = wait_bars(reader.waits(run_id), now)
        html = pages.run_live(tree, node, statuses, now, outputs(tree), gates,
                              ask_name=any(n is None for n in tokens.values()) and auth is None,
                              logs=admin().step_logs(tree), waits=waits)
        return html, tree, node, inputs

    # -- pages --------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse)
    def runs(request: Request, pipeline: str | None = None, status: str | None = None,
             since: str | None = None, until: str | None = None, q: str | None = None,
             after: str | None = None, tenant: str | None = None) -> HTMLResponse:
        try:
            flt = RunFilter(app=app.dbos_name, pipeline=pipeline or None, status=status or None,
                            since=parse_since(since) if since else None,
                            until=parse_since(until) if until else None, text=q or None,
                            cursor=after or None, tenant=tenant or None)
            found, nxt = list_page(admin(), flt, page_size)
        except OperatorError as exc:
            raise HTTPException(400, str(exc)) from None
        raw = {k: v or "" for k, v in (("pipeline", pipeline), ("status", status), ("since", since),
                                        ("until", until), ("q", q), ("tenant", tenant))}
        body = pages.runs_page(found, flt, raw, nxt, sorted(app.pipelines))
        return _page(body, "runs", person=viewer(request))

    @api.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str, note: str | None = None) -> HTMLResponse:
        html, tree, node, inputs = live_html(run_id)
        paths = sorted({n.path for n in tree.walk() if n.path and n.kind in ("step", "child", "task")})
        return _page(pages.run_page(tree, html, inputs, paths), f"run {run_id}", note=note,
                     person=viewer(request))

    @api.get("/runs/{run_id}/live", response_class=HTMLResponse)
    def run_live(run_id: str) -> HTMLResponse:
        return HTMLResponse(live_html(run_id)[0])

    @api.get("/runs/{run_id}/events")
    def run_events(run_id: str, from_offset: int = 0,
                   last_event_id: str | None = Header(default=None)) -> StreamingResponse:
        """The run's event stream (SSE, no token chunks): the run page redraws on each."""
        check_owned(run_id)
        given = last_event_id or ""
        start = int(given) + 1 if given.isdigit() else max(0, from_offset)

        async def body() -> AsyncIterator[bytes]:
            async for ev in follow_async(admin().url, run_id, start):
                if ev.type is not EventType.TOKEN:
                    yield f"id: {ev.offset}\nevent: {ev.type.value}\ndata: {{}}\n\n".encode()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @api.get("/api/runs/{run_id}")
    def run_json(run_id: str) -> dict[str, Any]:
        tree, node, _ = load(run_id)
        out = tree.to_json()
        out["statuses"] = node_statuses(node, tree) if node is not None else {}
        return out

    @api.get("/approvals", response_class=HTMLResponse)
    def approvals(request: Request) -> HTMLResponse:
        gates = admin().waiting_gates()
        mine = {r.workflow_id for r in owned(sorted({g["run_id"] for g in gates}))}
        gates = [g for g in gates if g["run_id"] in mine]
        ask = any(n is None for n in tokens.values()) and auth is None
        return _page(pages.approvals_page(gates, ask), "approvals", person=viewer(request))

    @api.get("/login", response_class=HTMLResponse)
    def login_form(next: str = "/") -> HTMLResponse:
        return _page(pages.login_page(next), "sign in")

    @api.post("/login")
    def login(token: str = Form(...), next: str = Form("/")) -> Response:  # noqa: B008
        if not any(hmac.compare_digest(token.encode(), s.encode()) for s in tokens):
            return _page(pages.login_page(next, "unknown token"), "sign in", 401)
        resp = RedirectResponse(local_path(next), 303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return resp

    # -- changes ------------------------------------------------------------------------
    def done(run_id: str, note: str) -> RedirectResponse:
        return RedirectResponse(f"/runs/{run_id}?note={note.replace(' ', '+')}", 303)

    def decide(approve: bool, run_id: str, gate: str, who: Person, by: str | None,
               comment: str | None, workflow: str | None) -> RedirectResponse:
        name = (by or "").strip() if who[1] else who[0]
        if not name:
            raise HTTPException(400, "give the name you answer as (by)")
        if workflow and not workflow.startswith(f"{run_id}/"):
            raise HTTPException(400, f"workflow {workflow!r} is not one of run {run_id!r}'s")
        try:  # the form names the workflow that waits when it is a branch's or a task's
            admin().answer(workflow or run_id, gate, "approved" if approve else "rejected", name,
                           comment or None, app=Owner(app.name, app.dbos_name))
        except (UnknownRun, UnknownGate) as exc:
            raise HTTPException(404, str(exc)) from None
        except DurapipeError as exc:
            raise fail(exc) from None
        return done(run_id, f"{'approved' if approve else 'rejected'} gate {gate} as {name}")

    @api.post("/runs/{run_id}/gates/{gate}/approve")
    def approve(run_id: str, gate: str, who: Person = Depends(person),  # noqa: B008
                by: str | None = Form(None), comment: str | None = Form(None),  # noqa: B008
                workflow: str | None = Form(None)) -> Response:  # noqa: B008
        return decide(True, run_id, gate, who, by, comment, workflow)

    @api.post("/runs/{run_id}/gates/{gate}/reject")
    def reject(run_id: str, gate: str, who: Person = Depends(person),  # noqa: B008
               by: str | None = Form(None), comment: str | None = Form(None),  # noqa: B008
               workflow: str | None = Form(None)) -> Response:  # noqa: B008
        return decide(False, run_id, gate, who, by, comment, workflow)

    def steer(run_id: str, action: Callable[[], str | None], note: str) -> RedirectResponse:
        """Run an operator action on one of this app's runs, then show the run it returns
        (a fork's new run), else that run."""
        check_owned(run_id)
        try:
            shown = action()
        except DurapipeError as exc:
            raise fail(exc) from None
        return done(shown or run_id, note)

    @api.post("/runs/{run_id}/cancel")
    def cancel(run_id: str, who: Person = Depends(person)) -> Response:  # noqa: B008
        return steer(run_id, lambda: admin().cancel(run_id), "cancelled")

    @api.post("/runs/{run_id}/resume")
    def resume(run_id: str, who: Person = Depends(person)) -> Response:  # noqa: B008
        return steer(run_id, lambda: admin().resume(run_id), "resumed")

    @api.post("/runs/{run_id}/fork")
    def fork(run_id: str, node: str = Form(...), who: Person = Depends(person)) -> Response:  # noqa: B008
        return steer(run_id, lambda: admin().fork(run_id, node), f"forked from {run_id} at node {node}")

    return api


__all__ = ["create_console", "parse_tokens"]
