"""Human approval gates: the run announces a request and waits durably for the answer.

The contract other parts (CLI, SQL views, HTTP service) build on:

- While waiting, the workflow that runs the gate holds the DBOS event ``gate:<name>`` =
  ``{"gate", "status": "waiting", "message", "approvers", "requested_at"}`` (epoch ms) and
  waits in ``DBOS.recv(topic="gate:<name>")``.
- :func:`answer` (``App.approve``/``App.reject``), in one transaction: turns the event
  into the decision (below) only if it still says waiting, then sends
  ``{"decision": "approved"|"rejected", "by", "comment", "at", "requested_at"}`` on that
  topic with an idempotency key per request. So the decision is visible as soon as
  ``answer`` returns, an answer sent twice is applied once, and of answers sent at the
  same moment exactly one applies (the others are refused with ``UnknownGate``).
- The decided event is ``{"gate", "status": "approved"|"rejected"|"timed_out", "by",
  "comment", "decided_at", "message", "approvers", "requested_at"}``; unless the gate
  fails the run, ``state[name] = {"approved", "by", "comment", "at"}``. The workflow
  writes the same event itself as a recorded ``DBOS.setEvent`` (so a fork or a rewind
  restores it), deferred until the next node is under way (``RunContext.defer``); a
  timeout is written by the workflow alone, before it goes on.

A gate inside a branch that runs as a child workflow (race, timeout, parallel, map) is
waited on by that child; :func:`answer` and :func:`pending` look at a run and all the
child workflows below it, so callers always use the run id they started.

Answers need only the database: :func:`answer` and :func:`pending` work on a
:class:`Store`, the launched DBOS runtime (``App.approve``) or a ``DBOSClient``
(``Admin.answer``: ``durapipe approve`` and the console, with no App launched).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import sqlalchemy as sa
from dbos import DBOS
from dbos._context import snapshot_step_context
from dbos._core import set_event as dbos_set_event
from dbos._dbos import _get_dbos_instance
from dbos._serialization import WorkflowSerializationFormat, deserialize_value, serialize_value
from dbos._sys_db import SendMessage
from sqlalchemy.dialects.postgresql import JSONB

from ..errors import ApprovalRefused, GateRejected, NodeFailed, NodeTimeout, UnknownGate, error_text
from ..ir import Gate
from ..state import State, render
from . import events
from .context import RunContext, run_step
from .scope import (
    DURAPIPE_WORKFLOWS,
    MAX_COMMENT,
    Owner,
    belongs_to,
    check_name,
    check_run,
    check_run_id,
    named_one_of,
    owned_by,
    run_names_sql,
)
from .steps import TESTED_DBOS, dbos_release

# recv needs a finite timeout; a gate without one waits ten years.
FOREVER_SECONDS = 10 * 365 * 24 * 3600.0
# A run waiting at a gate is PENDING; one handed to another worker (a deploy's drain, a
# recovery through a queue) is ENQUEUED until a worker takes it: the answer waits for it.
ANSWERABLE = ("PENDING", "ENQUEUED")


def event_key(gate: str) -> str:
    """The DBOS event (and message topic) of a gate: ``gate:<name>``."""
    return f"gate:{gate}"


def now_ms() -> int:
    return int(time.time() * 1000)


def decided_event(base: dict[str, Any], status: str, by: str | None, comment: str | None,
                  at: int) -> dict[str, Any]:
    """The ``gate:<name>`` event once decided; ``base`` is the waiting event."""
    return {**{k: v for k, v in base.items() if k != "status"}, "status": status, "by": by,
            "comment": comment, "decided_at": at}


@dataclass(frozen=True)
class PendingGate:
    """A gate some run is waiting at. ``requested_at`` is epoch milliseconds."""

    run_id: str
    gate: str
    message: str
    approvers: list[str] | None
    requested_at: int


# -- the handler ------------------------------------------------------------------------

async def run_gate(ctx: RunContext, node: Gate, path: str, state: State) -> State:
    where = f"{path}:{node.name}"
    if node.when is not None:
        try:
            wanted = node.when(dict(state))
        except Exception as exc:
            raise NodeFailed(f"gate {where}: when() raised {error_text(exc)}", node=where,
                             cause=error_text(exc)) from exc
        if not wanted:
            events.emit("node_skipped", path=path, name=node.name, kind="gate",
                        key=f"skipped:{path}", data={"reason": "when() is false"})
            return {}
    await ctx.settle()  # an earlier pass's decision is written before this pass announces
    message = render(node.message, state, f"gate {where}")
    requested_at: int = await run_step(where, 0, now_ms)
    key = event_key(node.name)
    base = {"gate": node.name, "message": message,
            "approvers": list(node.approvers) if node.approvers is not None else None,
            "requested_at": requested_at}
    await DBOS.set_event_async(key, {**base, "status": "waiting"})
    events.emit("gate_waiting", path=path, name=node.name, kind="gate", key=f"waiting:{path}",
                data={"message": message, "approvers": base["approvers"],
                      "requested_at": requested_at})

    deadline = requested_at + node.timeout_seconds * 1000 if node.timeout_seconds else None
    wait = node.timeout_seconds or FOREVER_SECONDS
    while True:
        msg = await DBOS.recv_async(topic=key, timeout_seconds=wait)
        if msg is None or (isinstance(msg, dict) and msg.get("requested_at") == requested_at):
            break
        # An answer meant for an earlier request of this gate (a loop pass): not ours.
        wait = max(0.001, (deadline - now_ms()) / 1000) if deadline else FOREVER_SECONDS

    if msg is None:
        status, by, comment, at = "timed_out", None, None, int(deadline or now_ms())
        approved = node.on_timeout == "approve"
        await DBOS.set_event_async(key, decided_event(base, status, by, comment, at))
    else:
        status, by, comment, at = msg["decision"], msg.get("by"), msg.get("comment"), msg["at"]
        approved = status == "approved"
        # answer() already turned the event into this decision in the transaction that sent
        # the message; the workflow's own write (recorded for forks) need not hold up the
        # next node.
        record, op = decided_event(base, status, by, comment, at), snapshot_step_context()
        ctx.defer(lambda: asyncio.to_thread(
            dbos_set_event, _get_dbos_instance(), op, key, record,
            serialization_type=WorkflowSerializationFormat.DEFAULT))
    events.emit("gate_answered", path=path, name=node.name, kind="gate", key=f"answered:{path}",
                data={"status": status, "by": by, "comment": comment, "at": at})
    if msg is None and node.on_timeout == "fail":
        raise NodeTimeout(f"gate {where} got no answer within {node.timeout_seconds:g} s",
                          node=where, gate=node.name, seconds=node.timeout_seconds)
    if not approved:
        why = (f"got no answer within {node.timeout_seconds:g} s (on_timeout='reject')"
               if msg is None else f"was rejected by {by!r}" + (f": {comment}" if comment else ""))
        raise GateRejected(f"gate {where} {why}", node=where, gate=node.name, by=by,
                           comment=comment, status=status)
    return {node.name: {"approved": True, "by": by, "comment": comment, "at": at}}


# -- answers on recorded runs (the App calls these with its scope.Owner) --------------

@dataclass(frozen=True)
class Store:
    """Where gates are read and answered: the launched DBOS runtime or a ``DBOSClient``.

    ``sys_db`` is DBOS's system database, used (on the DBOS releases in ``TESTED_DBOS``) to
    check and record a decision in the transaction that sends it; elsewhere answers go
    through the public calls alone (see :func:`_answer_public`)."""

    sys_db: Any
    list_workflows: Callable[..., list[Any]]
    all_events: Callable[[str], dict[str, Any]]
    get_event: Callable[[str, str], Any]
    send: Callable[[str, Any, str, str], None]


def runtime_store() -> Store:
    """The launched DBOS runtime's store (what ``App.approve`` answers through)."""
    return Store(
        sys_db=_get_dbos_instance()._sys_db, list_workflows=DBOS.list_workflows,
        all_events=DBOS.get_all_events,
        get_event=lambda wf, key: DBOS.get_event(wf, key, timeout_seconds=0),
        send=lambda wf, msg, topic, key: DBOS.send(wf, msg, topic, idempotency_key=key))


def client_store(client: Any) -> Store:
    """A ``DBOSClient``'s store: answers from the database alone, no App launched."""
    sys_db = client._sys_db
    return Store(
        sys_db=sys_db, list_workflows=client.list_workflows,
        all_events=lambda wf: dict(sys_db.get_all_events(wf)),
        get_event=lambda wf, key: client.get_event(wf, key, timeout_seconds=0),
        send=lambda wf, msg, topic, key: client.send(wf, msg, topic, idempotency_key=key))


def _idempotency_key(workflow_id: str, key: str, requested_at: Any) -> str:
    return f"durapipe:{workflow_id}:{key}:{requested_at}"


def root_of(status: Any) -> str:
    """The run a workflow belongs to: its own id for a run, the run's for a child or task."""
    args = (status.input or {}).get("args") if isinstance(status.input, dict) else None
    if isinstance(args, (list, tuple)) and len(args) >= 5 and isinstance(args[4], str) and args[4]:
        return args[4]
    return str(status.workflow_id)


def _waiting(owner: Owner, run_id: str | None, store: Store) -> list[tuple[str, str, dict[str, Any]]]:
    """(workflow id, run id, event) of every gate being waited at, oldest request first."""
    opts: dict[str, Any] = {"status": list(ANSWERABLE), "load_output": False}
    if run_id is None:
        statuses = store.list_workflows(**opts)
    else:
        statuses = (store.list_workflows(workflow_ids=[run_id], **opts)
                    + store.list_workflows(workflow_id_prefix=f"{run_id}/", **opts))
    found: list[tuple[str, str, dict[str, Any]]] = []
    for st in statuses:
        if not named_one_of(st.name, DURAPIPE_WORKFLOWS) or not belongs_to(owner.dbos_name, st):
            continue
        for key, value in store.all_events(st.workflow_id).items():
            if (key.startswith("gate:") and isinstance(value, dict)
                    and value.get("status") == "waiting"):
                found.append((st.workflow_id, root_of(st), value))
    found.sort(key=lambda f: (f[2].get("requested_at") or 0, f[0]))
    return found


def waiting_at(owner: Owner, run_id: str, gate: str, store: Store) -> list[str]:
    """The ids of the run's workflows (its own, its branches') waiting at ``gate``."""
    return [wf for wf, _, ev in _waiting(owner, run_id, store) if ev.get("gate") == gate]


def pending(owner: Owner, run_id: str | None = None, store: Store | None = None) -> list[PendingGate]:
    """The gates waiting for an answer, of one run or of every run of the app."""
    store = store or runtime_store()
    if run_id is not None:
        run_id = check_run_id(run_id, f"app {owner.name!r}.pending")
        rows = store.list_workflows(workflow_ids=[run_id], load_input=False, load_output=False)
        check_run(owner, run_id, rows[0] if rows else None)
    return [PendingGate(root, ev["gate"], ev["message"], ev.get("approvers"), ev["requested_at"])
            for _, root, ev in _waiting(owner, run_id, store)]


@dataclass(frozen=True)
class _Found:
    """What one read of a workflow and its ``gate:<name>`` event found."""

    status: str
    name: str | None
    application_name: str | None
    event: Any


def _is_waiting(event: Any) -> bool:
    return isinstance(event, dict) and event.get("status") == "waiting"


def _check_approver(event: dict[str, Any], gate: str, by: str, run_id: str) -> None:
    approvers = event.get("approvers")
    if approvers is not None and by not in approvers:
        raise ApprovalRefused(
            f"{by!r} may not answer gate {gate!r} of run {run_id!r}; its approvers are "
            f"{approvers}. Nothing was changed", run_id=run_id, gate=gate, by=by,
            approvers=approvers,
        )


def _send(c: Any, sys_db: Any, workflow_id: str, key: str, message: dict[str, Any]) -> None:
    sys_db.send_bulk_with_connection(
        [SendMessage(workflow_id, message, key,
                     _idempotency_key(workflow_id, key, message["requested_at"]))],
        c, serialization_type=WorkflowSerializationFormat.DEFAULT,
        function_name="DBOS.send", send_to_forks=False)


def _field(doc: Any, op: str, name: str) -> Any:
    return doc.op(op)(sa.cast(name, sa.Text))


# The claim statement of _send_at_once, built once per DBOS system database.
_claims: dict[int, tuple[Any, Any]] = {}


def _claim_statement(sys_db: Any) -> Any:
    """UPDATE the gate event of a PENDING workflow of the app from waiting to the decision,
    if ``by`` may answer it; RETURNING its ``requested_at``. Parameters: wf, gate_key,
    app (the app's DBOS name, see ``scope.owned_by``), decision, by, comment, at."""
    tables = sys_db.tables
    cached = _claims.get(id(sys_db))
    if cached is not None and cached[0] is tables:
        return cached[1]
    ws, we = tables.workflow_status, tables.workflow_events
    # CASE keeps a value in another serialization from ever being cast.
    ev = sa.case((we.c.serialization == sys_db.serializer.name(), sa.cast(we.c.value, JSONB)))
    by = sa.cast(sa.bindparam("by", type_=sa.Text), sa.Text)
    decided = ev.op("||")(sa.func.jsonb_build_object(
        "status", sa.cast(sa.bindparam("decision", type_=sa.Text), sa.Text), "by", by,
        "comment", sa.cast(sa.bindparam("comment", type_=sa.Text), sa.Text),
        "decided_at", sa.cast(sa.bindparam("at", type_=sa.BigInteger), sa.BigInteger)))
    stmt = (sa.update(we)
            .where(we.c.workflow_uuid == sa.bindparam("wf", type_=sa.Text),
                   we.c.key == sa.bindparam("gate_key", type_=sa.Text),
                   ws.c.workflow_uuid == we.c.workflow_uuid, ws.c.status.in_(ANSWERABLE),
                   sa.or_(ws.c.name.in_(DURAPIPE_WORKFLOWS), run_names_sql(ws.c.name)),
                   owned_by(ws.c.application_name, sa.bindparam("app", type_=sa.Text)),
                   _field(ev, "->>", "status") == "waiting",
                   sa.or_(sa.func.jsonb_typeof(_field(ev, "->", "approvers")).is_distinct_from("array"),
                          _field(ev, "->", "approvers").op("@>")(sa.func.jsonb_build_array(by))))
            .values(value=sa.cast(decided, sa.Text))
            .returning(_field(ev, "->>", "requested_at")))
    _claims[id(sys_db)] = (tables, stmt)
    return stmt


def _send_at_once(owner: Owner, workflow_id: str, gate: str, decision: str, by: str,
                  comment: str | None, store: Store) -> bool:
    """Postgres: check and record the decision in one statement, then send; False if not.

    The event turns into the decision only when the workflow is PENDING, the event says
    waiting and ``by`` is among its approvers (if it lists any); anything else changes
    nothing and :func:`_send_if_waiting` finds out why.
    """
    sys_db = store.sys_db
    if sys_db.engine.dialect.name != "postgresql":
        return False
    key, at = event_key(gate), now_ms()
    with sys_db.engine.begin() as c:
        row = c.execute(_claim_statement(sys_db), {
            "wf": workflow_id, "gate_key": key, "app": owner.dbos_name,
            "decision": decision, "by": by, "comment": comment, "at": at}).first()
        if row is None:
            return False
        _send(c, sys_db, workflow_id, key, {"decision": decision, "by": by, "comment": comment,
                                            "at": at, "requested_at": int(row[0])})
    return True


def _send_if_waiting(owner: Owner, workflow_id: str, gate: str, decision: str, by: str,
                     comment: str | None, run_id: str, store: Store) -> _Found | None:
    """Answer ``gate`` of one workflow in one transaction, or say what is there instead.

    Reads the workflow's status and the gate's event together; when the workflow waits at
    the gate, checks the approvers, turns the event into the decision (only if it still
    holds the waiting value read, so of two concurrent answers one is refused) and sends
    the answer. The waiting workflow wakes on commit. Returns None once sent, else what
    was found; raises UnknownRun for a workflow that is not one of the app's.
    """
    sys_db = store.sys_db
    ws, we = sys_db.tables.workflow_status, sys_db.tables.workflow_events
    key = event_key(gate)
    query = (sa.select(ws.c.status, ws.c.name, ws.c.application_name, we.c.value,
                       we.c.serialization)
             .select_from(ws.outerjoin(we, sa.and_(we.c.workflow_uuid == ws.c.workflow_uuid,
                                                   we.c.key == key)))
             .where(ws.c.workflow_uuid == workflow_id))
    with sys_db.engine.begin() as c:
        row = c.execute(query).first()
        found = _Found(row.status, row.name, row.application_name, None) if row else None
        check_run(owner, workflow_id, found, DURAPIPE_WORKFLOWS)
        assert row is not None and found is not None  # UnknownRun otherwise
        event: Any = (deserialize_value(row.value, row.serialization, sys_db.serializer)
                      if row.value is not None else None)
        found = _Found(row.status, row.name, row.application_name, event)
        if row.status not in ANSWERABLE or not _is_waiting(event):
            return found
        _check_approver(event, gate, by, run_id)
        requested_at, at = event["requested_at"], now_ms()
        value, serialization = serialize_value(
            decided_event(event, decision, by, comment, at),
            WorkflowSerializationFormat.DEFAULT, sys_db.serializer)
        claimed = c.execute(
            sa.update(we)
            .where(we.c.workflow_uuid == workflow_id, we.c.key == key, we.c.value == row.value)
            .values(value=value, serialization=serialization))
        if claimed.rowcount != 1:
            raise UnknownGate(
                f"run {run_id!r} is not waiting at gate {gate!r}: another answer was recorded "
                "while this one was checked. Nothing was changed", run_id=run_id, gate=gate,
                waiting=[])
        _send(c, sys_db, workflow_id, key, {"decision": decision, "by": by, "comment": comment,
                                            "at": at, "requested_at": requested_at})
    return None


def answer(owner: Owner, run_id: str, gate: str, decision: str, by: str,
           comment: str | None, store: Store | None = None) -> str:
    """Send a decision to a run waiting at ``gate``; validate everything before sending.
    Returns the id of the workflow answered: the run's, or a branch's child workflow's.

    The usual case (the run itself waits at the gate) takes one transaction; a gate waited
    at by a branch's child workflow is looked for only when the run has none waiting. When
    several workflows of the run wait at ``gate`` (a gate inside ``map_over``), the oldest
    request is answered.
    """
    verb = "approve" if decision == "approved" else "reject"
    where = f"app {owner.name!r}.{verb}"
    run_id = check_run_id(run_id, where)
    check_name(gate, "gate name", where)
    check_name(by, "by= (who answers)", where)
    check_name(comment, "comment", where, MAX_COMMENT, optional=True)
    store = store or runtime_store()
    if dbos_release() not in TESTED_DBOS:
        return _answer_public(owner, run_id, gate, decision, by, comment, store)
    if _send_at_once(owner, run_id, gate, decision, by, comment, store):
        return run_id
    found = _send_if_waiting(owner, run_id, gate, decision, by, comment, run_id, store)
    if found is None:
        return run_id
    waiting = _waiting(owner, run_id, store)
    for workflow_id, _, _ in (w for w in waiting if w[2].get("gate") == gate):
        if _send_if_waiting(owner, workflow_id, gate, decision, by, comment, run_id, store) is None:
            return workflow_id
    _not_waiting(run_id, gate, found.status, found.event, waiting)


def _not_waiting(run_id: str, gate: str, status: str, ev: Any,
                 waiting: list[tuple[str, str, dict[str, Any]]]) -> NoReturn:
    others = sorted({str(w[2].get("gate")) for w in waiting if w[2].get("gate") != gate})
    if isinstance(ev, dict) and ev.get("status") not in (None, "waiting"):
        where = f"it was already {ev['status']}" + (f" by {ev['by']!r}" if ev.get("by") else "")
        where += f" (and is waiting at {others})" if others else ""
    elif others:
        where = f"it is waiting at {others}"
    else:
        where = f"it is not waiting at any gate (status {status})"
    raise UnknownGate(f"run {run_id!r} is not waiting at gate {gate!r}: {where}",
                      run_id=run_id, gate=gate, waiting=others)


def _answer_public(owner: Owner, run_id: str, gate: str, decision: str, by: str,
                   comment: str | None, store: Store) -> str:
    """:func:`answer` through DBOS's public calls only (a DBOS release durapipe is not
    tested with): the same checks, then a message whose idempotency key is the request's,
    so a request is decided once. The gate's event turns into the decision when the
    waiting workflow receives it, and an answer that loses a race is dropped silently
    instead of refused."""
    key = event_key(gate)
    rows = store.list_workflows(workflow_ids=[run_id], load_input=False, load_output=False)
    check_run(owner, run_id, rows[0] if rows else None, DURAPIPE_WORKFLOWS)
    children = store.list_workflows(workflow_id_prefix=f"{run_id}/", status=list(ANSWERABLE),
                                    load_input=False, load_output=False)
    first_event: Any = None
    for st in [rows[0], *sorted(children, key=lambda c: str(c.workflow_id))]:
        if not named_one_of(st.name, DURAPIPE_WORKFLOWS) or not belongs_to(owner.dbos_name, st):
            continue
        event = store.get_event(st.workflow_id, key)
        first_event = event if st is rows[0] else first_event
        if st.status not in ANSWERABLE or not _is_waiting(event):
            continue
        _check_approver(event, gate, by, run_id)
        message = {"decision": decision, "by": by, "comment": comment, "at": now_ms(),
                   "requested_at": event["requested_at"]}
        store.send(st.workflow_id, message, key,
                   _idempotency_key(st.workflow_id, key, event["requested_at"]))
        return str(st.workflow_id)
    _not_waiting(run_id, gate, rows[0].status, first_event, [])
