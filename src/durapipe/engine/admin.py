"""Operator access to recorded runs, without launching an App: list, show, cancel, resume,
fork, recover. Built on ``DBOSClient``, so it works from any process that can reach the
database (Postgres or the SQLite file) and needs none of the pipelines' code.

>>> with Admin("postgresql://localhost/app") as admin:
...     admin.list_runs(status="ERROR", limit=10)
...     admin.tree("post-42").nodes
...     admin.fork("post-42", from_node="0.2")       # re-run from node 0.2, keep earlier results
"""

from __future__ import annotations

import os
import re
import shlex
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from dbos import DBOSClient
from dbos._serialization import DBOSPortableJSONSerializer
from dbos._utils import INTERNAL_QUEUE_NAME

from ..audit import NodeRecord, RunInfo, RunTree, first_line, model_usage, path_key, redact, split_step_name
from ..errors import OperatorError, UnknownRun, error_text, from_portable
from . import executors, gates, runlist
from .admission import TENANT
from .database import normalize_url
from .dispatch import DETACHED_ATTRIBUTE, fate_key, find_task_in, task_query, task_status
from .scope import (
    DURAPIPE_WORKFLOWS,
    TASK_WORKFLOW,
    WORKFLOW_NAME,
    Owner,
    app_of,
    check_name,
    check_run_id,
    is_run_workflow,
    named_one_of,
    refuse,
    run_workflow_name,
)
from .steplogs import LOG_EVENT_PREFIX

# Child workflows durapipe starts: subtrees (|, race, timeout, map, flow) and dispatched tasks.
CHILD_WORKFLOWS = DURAPIPE_WORKFLOWS

_SINCE_RE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
ACTIVE = ("PENDING", "ENQUEUED", "DELAYED")


def database_url_or_env(url: str | None) -> str:
    """The database to operate on: ``url``, else ``DURAPIPE_DATABASE_URL``."""
    url = url or os.environ.get("DURAPIPE_DATABASE_URL")
    if not url:
        raise OperatorError("no database given: pass --database-url or set DURAPIPE_DATABASE_URL")
    return normalize_url(url)


def parse_since(text: str) -> datetime:
    """``30m``, ``2h``, ``7d`` ago, or an ISO date/time, as an aware datetime."""
    m = _SINCE_RE.match(text.strip())
    if m:
        delta = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        return datetime.now(timezone.utc) - delta
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise OperatorError(
            f"--since {text!r}: use an age like 30m, 2h, 7d or an ISO date like 2026-01-31"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _err(exc: Any) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, BaseException):
        return error_text(from_portable(exc))
    return str(exc)


def _args(status: Any) -> list[Any]:
    inp = status.input
    if isinstance(inp, dict):
        return list(inp.get("args") or [])
    return []


class Admin:
    """Read and steer runs recorded in one database (see the module docstring)."""

    def __init__(self, database_url: str | None = None) -> None:
        self.url = database_url_or_env(database_url)
        if self.url.startswith("sqlite:///"):
            path = self.url.split("sqlite:///", 1)[1]
            if path and path != ":memory:" and not os.path.exists(path):
                raise OperatorError(f"no database file {path!r} (from {self.url})", url=self.url)
        elif not self.url.startswith(("postgresql://", "postgres://")):
            raise OperatorError(
                f"database URL {self.url!r}: use postgresql://... or sqlite:///path", url=self.url
            )
        try:
            self.client = DBOSClient(
                system_database_url=self.url, serializer=DBOSPortableJSONSerializer(),
                retry_connection_errors=False,
            )
        except Exception as exc:
            raise OperatorError(f"cannot reach database {redact(self.url)}: {first_line(exc)}",
                                url=redact(self.url)) from None

    def close(self) -> None:
        self.client.destroy()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- runs ---------------------------------------------------------------------------
    def _info(self, st: Any) -> RunInfo:
        args = _args(st)
        end = st.completed_at if st.status not in ACTIVE else None
        duration = (end - st.created_at) if end and st.created_at else None
        return RunInfo(
            run_id=st.workflow_id, pipeline=args[0] if args else None, status=st.status,
            created_ms=st.created_at, duration_ms=duration, error=_err(st.error),
            executor_id=st.executor_id, queue=st.queue_name, app=st.application_name,
            app_version=st.app_version, forked_from=st.forked_from,
            tenant=(st.attributes or {}).get(TENANT) if isinstance(st.attributes, dict) else None,
        )

    def list_runs(self, *, pipeline: str | None = None, status: str | None = None,
                  since: datetime | None = None, limit: int = 50,
                  tenant: str | None = None) -> list[RunInfo]:
        """Newest first. On Postgres one indexed query (:mod:`.runlist`); elsewhere through
        DBOS's API by workflow name (``durapipe.run:<pipeline>``). Filters are parameters,
        never pasted into SQL."""
        found = runlist.page(self.url, runlist.RunQuery(pipeline=pipeline, status=status,
                                                        since=since, tenant=tenant), limit)
        if found is not None:
            return found[0]
        # DBOS filters attributes on Postgres (a GIN index); on SQLite they are read here.
        attrs = {TENANT: tenant} if tenant is not None and not self.url.startswith("sqlite") else None
        out: list[RunInfo] = []
        # Runs recorded before runs were named by pipeline are all "durapipe.run".
        names = [run_workflow_name(pipeline), WORKFLOW_NAME] if pipeline is not None else None
        offset = 0
        size = max(limit, 100)
        while len(out) < limit:
            rows = self.client.list_workflows(
                name=names, has_parent=False, status=status.upper() if status else None,
                start_time=since.isoformat() if since else None, sort_desc=True,
                limit=size, offset=offset, load_output=True, attributes=attrs,
            )
            for st in rows:
                info = self._info(st)
                if is_run_workflow(st.name) and (pipeline is None or info.pipeline == pipeline) and (
                        tenant is None or info.tenant == tenant):
                    out.append(info)
            if len(rows) < size:
                break
            offset += size
        return out[:limit]

    def _status(self, workflow_id: str) -> Any:
        rows = self.client.list_workflows(workflow_ids=[workflow_id], load_output=True)
        return rows[0] if rows else None

    def run(self, run_id: str) -> RunInfo:
        run_id = check_run_id(run_id, "")
        st = self._status(run_id)
        if st is None or not is_run_workflow(st.name):
            raise UnknownRun(f"no durapipe run with id {run_id!r} in {redact(self.url)}", run_id=run_id)
        return self._info(st)

    def tree(self, run_id: str) -> RunTree:
        """The run and every recorded node, child workflows nested, in path order."""
        info = self.run(run_id)
        st = self._status(run_id)
        return RunTree(info, self._nodes(run_id, run_id), st.output if st else None)

    def _nodes(self, workflow_id: str, root: str) -> list[NodeRecord]:
        now = int(time.time() * 1000)
        nodes: list[NodeRecord] = []
        tasks: dict[str, NodeRecord] = {}
        joins: dict[str, bool] = {}  # child id -> its join recorded an error
        for step in self.client.list_workflow_steps(workflow_id):
            cid = step["child_workflow_id"]
            started, done = step["started_at_epoch_ms"], step["completed_at_epoch_ms"]
            if cid and named_one_of(step["function_name"], CHILD_WORKFLOWS):
                node = self._child_node(cid, root, now)
                if step["function_name"] == TASK_WORKFLOW:
                    tasks[cid] = node
            else:
                path, name, kind = split_step_name(step["function_name"])
                if kind == "dbos-op" and name == "DBOS.getResult":
                    if cid:
                        joins.setdefault(cid, step["error"] is not None)
                    continue  # the wait for a child: the child node already shows it
                model, tin, tout = model_usage(step["output"])
                node = NodeRecord(
                    path=path, name=name, kind=kind,
                    status="ERROR" if step["error"] is not None else "SUCCESS",
                    started_ms=started, duration_ms=(done - started) if done and started else None,
                    error=_err(step["error"]), model=model, input_tokens=tin, output_tokens=tout,
                    workflow_id=workflow_id,
                )
            nodes.append(node)
        events = self._events(workflow_id)
        for cid, child in tasks.items():
            child.kind = "task"
            child.detail["task"] = child.name
            child.detail["task_status"] = task_status(cid in joins, joins.get(cid, False),
                                                      events.get(fate_key(cid)),
                                                      bool(child.detail.get("detached")))
        for key, value in events.items():
            if key.startswith("gate:") and isinstance(value, dict):
                nodes.append(NodeRecord(
                    path=None, name=str(value.get("gate") or key.split(":", 1)[1]), kind="gate",
                    status=str(value.get("status", "")).upper(), workflow_id=workflow_id,
                    detail={k: value.get(k) for k in ("message", "by", "comment", "approvers",
                                                      "requested_at", "decided_at")
                            if value.get(k) is not None},
                ))
        nodes.sort(key=lambda n: (n.kind == "gate", path_key(n.path), n.started_ms or 0))
        return nodes

    def _child_node(self, child_id: str, root: str, now: int) -> NodeRecord:
        st = self._status(child_id)
        if st is None:
            return NodeRecord(path=None, name=child_id, kind="child", status="UNKNOWN",
                              workflow_id=child_id)
        args = _args(st)
        path = str(args[3]) if len(args) > 3 else None
        prefix = f"{root}/{path}:"
        name = child_id[len(prefix):] if path and child_id.startswith(prefix) else child_id
        end = st.completed_at if st.status not in ACTIVE else now
        detached = (getattr(st, "attributes", None) or {}).get(DETACHED_ATTRIBUTE) == "true"
        return NodeRecord(
            path=path, name=name, kind="child", status=st.status, started_ms=st.created_at,
            duration_ms=(end - st.created_at) if end and st.created_at else None,
            error=_err(st.error), workflow_id=child_id, children=self._nodes(child_id, root),
            detail={"detached": True} if detached else {},
        )

    def _events(self, workflow_id: str) -> dict[str, Any]:
        return dict(self.client._sys_db.get_all_events(workflow_id))

    def step_logs(self, tree: RunTree) -> dict[tuple[str, str], dict[str, Any]]:
        """What the steps of a run and of its child workflows logged, and the traceback of
        each failed one: (workflow id, step name) -> the ``log:<step name>`` event."""
        ids = {tree.run.run_id} | {n.workflow_id for n in tree.walk() if n.workflow_id}
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for wid in sorted(ids):
            for key, value in self._events(wid).items():
                if key.startswith(LOG_EVENT_PREFIX) and isinstance(value, dict):
                    found[(wid, key[len(LOG_EVENT_PREFIX):])] = value
        return found

    def waiting_gates(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Gates some active run is waiting at (from the ``gate:<name>`` events), also those
        a branch's child workflow or a background task waits at: ``run_id`` of each entry is
        the workflow that waits (answering that id answers exactly that gate), ``root`` the
        run it belongs to."""
        opts: dict[str, Any] = {"status": list(ACTIVE), "load_input": True, "load_output": False}
        if run_id is not None:
            self.run(run_id)
            rows = (self.client.list_workflows(workflow_ids=[run_id], **opts)
                    + self.client.list_workflows(workflow_id_prefix=f"{run_id}/", **opts))
        else:
            rows = self.client.list_workflows(**opts)
        # Runs are durapipe.run:<pipeline> (or durapipe.run before that), tasks durapipe.task.
        rows = [st for st in rows if is_run_workflow(st.name) or st.name == TASK_WORKFLOW]
        out = []
        for st in rows:
            for key, value in self._events(st.workflow_id).items():
                if key.startswith("gate:") and isinstance(value, dict) and value.get("status") == "waiting":
                    out.append({"run_id": st.workflow_id, "root": gates.root_of(st), **value})
        return out

    # -- steering -----------------------------------------------------------------------
    def owner_of(self, run_id: str, app: Owner | None = None) -> Owner:
        """The app a run belongs to, as recorded on its row (``app``: refuse, as unknown,
        a run that is not that app's). A run whose row names no app belongs to none:
        nothing may answer its gates."""
        run_id = check_run_id(run_id, "")
        rows = self.client.list_workflows(workflow_ids=[run_id], load_input=False, load_output=False)
        if not rows or not named_one_of(rows[0].name, DURAPIPE_WORKFLOWS):
            if app is not None:
                raise refuse(app.name, run_id)
            raise UnknownRun(f"no durapipe run with id {run_id!r} in {redact(self.url)}", run_id=run_id)
        owner = app_of(rows[0])
        if app is not None:
            if owner != app.dbos_name:
                raise refuse(app.name, run_id)
            return app
        if owner is None:
            raise OperatorError(
                f"run {run_id!r} records no app (its workflow row has no application_name), so "
                "it belongs to no app and none may answer its gates", run_id=run_id)
        return Owner(owner, owner)

    def answer(self, run_id: str, gate: str, decision: str, by: str, comment: str | None = None,
               *, app: Owner | None = None, exactly_one: bool = False) -> str:
        """Approve (``decision="approved"``) or reject a gate of a run from the database
        alone, no App launched: the gate's ``approvers`` check, one decision per request,
        and the run answered as one of its own app's (``app``: only that app's runs).
        Returns the id of the workflow answered (the run's, or a branch's).

        ``exactly_one`` refuses, changing nothing, when several workflows of the run wait
        at ``gate`` (a gate inside ``map_over`` or parallel branches), naming them: answer
        one by its own id. Without it the oldest request is answered (``App.approve``)."""
        owner = self.owner_of(run_id, app)
        store = gates.client_store(self.client)
        if exactly_one:
            waiting = gates.waiting_at(owner, run_id, gate, store)
            if len(waiting) > 1:
                raise OperatorError(
                    f"run {run_id!r} waits at gate {gate!r} in {len(waiting)} places: "
                    f"{', '.join(waiting)}; answer one by its own id, e.g. `durapipe approve "
                    f"{shlex.quote(waiting[0])} {shlex.quote(gate)} --by {shlex.quote(by)}`. "
                    "Nothing was changed", run_id=run_id, gate=gate, waiting=waiting)
        return gates.answer(owner, run_id, gate, decision, by, comment, store)

    def cancel(self, run_id: str) -> None:
        """Cancel a run and its child workflows and background tasks. The process executing
        them notices within a fraction of a second: an async step in flight stops at its
        next await, a sync step finishes, nothing more starts."""
        self.run(run_id)
        self.client.cancel_workflow(run_id, cancel_children=True)

    def cancel_task(self, run_id: str, name: str) -> str:
        """Cancel the background task ``name`` of a run (a detached one too), with its own
        child workflows; the run goes on. Returns the task's workflow id."""
        self.run(run_id)
        found = self.client.list_workflows(**task_query(run_id, name, self.client._sys_db))
        child = find_task_in(run_id, name, found)
        if child is None:
            raise OperatorError(f"run {run_id!r} has started no background task named {name!r}; "
                                f"`durapipe show {run_id}` lists its tasks", run_id=run_id, task=name)
        self.client.cancel_workflow(child, cancel_children=True)
        return child

    def resume(self, run_id: str, *, force: bool = False) -> None:
        """Resume a cancelled or stuck run from its last checkpoint (on any live worker).

        A PENDING run that a live process is executing is refused (``force=True``
        overrides: that process then loses the run at its next step).
        """
        info = self.run(run_id)
        if info.status in ("SUCCESS", "ERROR"):
            raise OperatorError(
                f"run {run_id!r} finished with {info.status}; resume continues unfinished runs, "
                f"use `durapipe fork {run_id} --from NODE` to re-run part of a finished one",
                run_id=run_id,
            )
        if (not force and info.status == "PENDING" and info.executor_id and info.app
                and executors.alive(self.url, info.app, info.executor_id)):
            raise OperatorError(
                f"run {run_id!r} is being executed by the live process with executor id "
                f"{info.executor_id!r}; it goes on by itself. Use --force to resume it elsewhere "
                "anyway (that process then stops at its next step)",
                run_id=run_id, executor_id=info.executor_id,
            )
        for child in self._cancelled_with(run_id):
            self.client.resume_workflow(child)
        self.client.resume_workflow(run_id)

    def _cancelled_with(self, run_id: str) -> list[str]:
        """The descendants that the run's own cancel cancelled (a cancel cascades), deepest
        first: resuming the run alone would leave it waiting on cancelled children. A task
        cancelled on its own before (``cancel_task``) stays cancelled."""
        root = self.client.list_workflows(workflow_ids=[run_id], load_input=False,
                                          load_output=False)
        if not root or root[0].status != "CANCELLED" or root[0].updated_at is None:
            return []
        since, frontier = root[0].updated_at, [run_id]
        found: list[str] = []
        while frontier:
            kids = self.client.list_workflows(parent_workflow_id=frontier, load_input=False,
                                              load_output=False)
            frontier = [k.workflow_id for k in kids if k.status == "CANCELLED"
                        and (k.updated_at or 0) >= since]
            found = frontier + found
        return found

    def step_of(self, run_id: str, node: str) -> int:
        """The DBOS step id where ``node`` (a path like ``0.2`` or a node name) first ran."""
        self.run(run_id)
        candidates: list[tuple[int, str]] = []
        for step in self.client.list_workflow_steps(run_id):
            fid, fname, cid = step["function_id"], step["function_name"], step["child_workflow_id"]
            if cid and named_one_of(fname, CHILD_WORKFLOWS):
                st = self._status(cid)
                args = _args(st) if st else []
                path = str(args[3]) if len(args) > 3 else None
                name = cid.rsplit(":", 1)[-1]
            else:
                path, name, kind = split_step_name(fname)
                if kind != "step":
                    continue
            if path is None:
                continue
            base = re.sub(r"#\d+", "", path)
            if node in (path, base, name) or base.startswith(node + ".") or path.startswith(node + "."):
                candidates.append((fid, path))
        if not candidates:
            raise OperatorError(
                f"run {run_id!r} recorded no step at node {node!r}; give a node path or name "
                f"from `durapipe show {run_id}` (only nodes that ran as steps or child workflows "
                "can be forked from)", run_id=run_id, node=node,
            )
        return min(fid for fid, _ in candidates)

    def fork(self, run_id: str, from_node: str | None = None, *, start_step: int | None = None) -> str:
        """Start a new run that copies ``run_id``'s results before ``from_node`` and re-runs
        from there, on the same application version. Returns the new run id."""
        info = self.run(run_id)
        step = start_step if start_step is not None else (self.step_of(run_id, from_node) if from_node else 1)
        handle = self.client.fork_workflow(run_id, step, application_version=info.app_version)
        return str(handle.workflow_id)

    def recover(self, executor_ids: list[str], *, force: bool = False) -> list[str]:
        """Hand the PENDING runs of dead executors back to the queues live workers poll.

        Each run (and child workflow) keeps its queue, or goes to DBOS's internal queue when
        it was started directly; a live worker of the same application version replays it
        from its last checkpoint. An executor id a live process holds is refused
        (``force=True`` overrides).
        """
        for executor in executor_ids:
            check_name(executor, "executor id", "recover")
        pending = self.client.list_workflows(status="PENDING", executor_id=list(executor_ids),
                                             load_input=False, load_output=False)
        if not force:
            live = sorted({(st.application_name, st.executor_id) for st in pending
                           if st.application_name and st.executor_id
                           and executors.alive(self.url, st.application_name, st.executor_id)})
            if live:
                raise OperatorError(
                    f"executor {live[0][1]!r} of app {live[0][0]!r} is alive: a live process "
                    "holds it and is executing its runs. Recover only executors whose process "
                    "is gone (--force overrides)", executor_id=live[0][1],
                )
        ids: list[str] = []
        for st in pending:
            # DBOS's own recovery step: PENDING -> ENQUEUED, only while still owned by the dead.
            if self.client._sys_db.reenqueue_for_recovery(st.workflow_id, list(executor_ids),
                                                          INTERNAL_QUEUE_NAME):
                ids.append(st.workflow_id)
        return ids

