"""Human approval gates: the run announces a request and waits durably for the answer.

The contract other parts (CLI, SQL views, HTTP service) build on:

- While waiting, the workflow that runs the gate holds the DBOS event ``gate:<name>`` =
  ``{"gate", "status": "waiting", "message", "approvers", "requested_at"}`` (epoch ms) and
  waits in ``DBOS.recv(topic="gate:<name>")``.
- :func:`answer` (``App.approve``/``App.reject``) sends
  ``{"decision": "approved"|"rejected", "by", "comment", "at", "requested_at"}`` on that
  topic with an idempotency key per request, so an answer sent twice is applied once.
- After the decision the event becomes ``{"gate", "status": "approved"|"rejected"|
  "timed_out", "by", "comment", "decided_at", "message", "approvers", "requested_at"}``
  and, unless the gate fails the run, ``state[name] = {"approved", "by", "comment", "at"}``.

A gate inside a branch that runs as a child workflow (race, timeout, parallel, map) is
waited on by that child; :func:`answer` and :func:`pending` look at a run and all the
child workflows below it, so callers always use the run id they started.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dbos import DBOS

from ..errors import (
    ApprovalRefused,
    DurapipeError,
    GateRejected,
    NodeFailed,
    NodeTimeout,
    UnknownGate,
    error_text,
)
from ..ir import Gate
from ..state import State, render
from .interpreter import WORKFLOW_NAME, RunContext, handles, run_step

if TYPE_CHECKING:
    from .app import App

# recv needs a finite timeout; a gate without one waits ten years.
FOREVER_SECONDS = 10 * 365 * 24 * 3600.0


def event_key(gate: str) -> str:
    """The DBOS event (and message topic) of a gate: ``gate:<name>``."""
    return f"gate:{gate}"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class PendingGate:
    """A gate some run is waiting at. ``requested_at`` is epoch milliseconds."""

    run_id: str
    gate: str
    message: str
    approvers: list[str] | None
    requested_at: int


# -- the handler ------------------------------------------------------------------------

@handles(Gate)
async def _gate(ctx: RunContext, node: Gate, path: str, state: State) -> State:
    where = f"{path}:{node.name}"
    if node.when is not None:
        try:
            wanted = node.when(dict(state))
        except Exception as exc:
            raise NodeFailed(f"gate {where}: when() raised {error_text(exc)}", node=where,
                             cause=error_text(exc)) from exc
        if not wanted:
            return {}
    message = render(node.message, state, f"gate {where}")
    requested_at: int = await run_step(where, 0, now_ms)
    key = event_key(node.name)
    base = {"gate": node.name, "message": message,
            "approvers": list(node.approvers) if node.approvers is not None else None,
            "requested_at": requested_at}
    await DBOS.set_event_async(key, {**base, "status": "waiting"})

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
    else:
        status, by, comment, at = msg["decision"], msg.get("by"), msg.get("comment"), msg["at"]
        approved = status == "approved"
    await DBOS.set_event_async(key, {**base, "status": status, "by": by, "comment": comment,
                                     "decided_at": at})
    if msg is None and node.on_timeout == "fail":
        raise NodeTimeout(f"gate {where} got no answer within {node.timeout_seconds:g} s",
                          node=where, gate=node.name, seconds=node.timeout_seconds)
    if not approved:
        why = (f"got no answer within {node.timeout_seconds:g} s (on_timeout='reject')"
               if msg is None else f"was rejected by {by!r}" + (f": {comment}" if comment else ""))
        raise GateRejected(f"gate {where} {why}", node=where, gate=node.name, by=by,
                           comment=comment, status=status)
    return {node.name: {"approved": True, "by": by, "comment": comment, "at": at}}


# -- the App side -----------------------------------------------------------------------

def _root_of(status: Any) -> str:
    args = (status.input or {}).get("args") if isinstance(status.input, dict) else None
    if isinstance(args, (list, tuple)) and len(args) >= 5 and isinstance(args[4], str) and args[4]:
        return args[4]
    return str(status.workflow_id)


def _waiting(app: App, run_id: str | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(workflow id, run id, event) of every gate being waited at, oldest request first."""
    opts: dict[str, Any] = {"status": "PENDING", "name": WORKFLOW_NAME, "load_output": False}
    if run_id is None:
        statuses = DBOS.list_workflows(**opts)
    else:
        statuses = (DBOS.list_workflows(workflow_ids=[run_id], **opts)
                    + DBOS.list_workflows(workflow_id_prefix=f"{run_id}/", **opts))
    prefix = f"durapipe-{app.dbos_name}-"
    found: list[tuple[str, str, dict[str, Any]]] = []
    for st in statuses:
        if st.app_version and not st.app_version.startswith(prefix):
            continue
        for key, value in DBOS.get_all_events(st.workflow_id).items():
            if (key.startswith("gate:") and isinstance(value, dict)
                    and value.get("status") == "waiting"):
                found.append((st.workflow_id, _root_of(st), value))
    found.sort(key=lambda f: (f[2].get("requested_at") or 0, f[0]))
    return found


def pending(app: App, run_id: str | None = None) -> list[PendingGate]:
    """The gates waiting for an answer, of one run or of every run of the app."""
    app._require_launched("pending")
    if run_id is not None:
        app._check_run(run_id, DBOS.get_workflow_status(run_id))
    return [PendingGate(root, ev["gate"], ev["message"], ev.get("approvers"), ev["requested_at"])
            for _, root, ev in _waiting(app, run_id)]


def answer(app: App, run_id: str, gate: str, decision: str, by: str,
           comment: str | None) -> None:
    """Send a decision to a run waiting at ``gate``; validate everything before sending."""
    verb = "approve" if decision == "approved" else "reject"
    app._require_launched(verb)
    if not isinstance(by, str) or not by:
        raise DurapipeError(f"app.{verb}({run_id!r}, {gate!r}): by= must name who answers")
    if comment is not None and not isinstance(comment, str):
        raise DurapipeError(f"app.{verb}({run_id!r}, {gate!r}): comment must be a string or None")
    status = DBOS.get_workflow_status(run_id)
    app._check_run(run_id, status)
    assert status is not None  # _check_run raised UnknownRun otherwise
    # Fast path: the gate is usually waited at by the run itself, not by a child workflow.
    own = DBOS.get_event(run_id, event_key(gate), timeout_seconds=0) if status.status == "PENDING" else None
    waiting = [(run_id, run_id, own)] if isinstance(own, dict) and own.get("status") == "waiting" else []
    if not waiting:
        waiting = _waiting(app, run_id)
    mine = [w for w in waiting if w[2].get("gate") == gate]
    if not mine:
        others = sorted({str(w[2].get("gate")) for w in waiting})
        where = (f"it is waiting at {others}" if others
                 else f"it is not waiting at any gate (status {status.status})")
        raise UnknownGate(
            f"run {run_id!r} is not waiting at gate {gate!r}: {where}",
            run_id=run_id, gate=gate, waiting=others,
        )
    workflow_id, _, event = mine[0]
    approvers = event.get("approvers")
    if approvers is not None and by not in approvers:
        raise ApprovalRefused(
            f"{by!r} may not answer gate {gate!r} of run {run_id!r}; its approvers are "
            f"{approvers}. Nothing was changed", run_id=run_id, gate=gate, by=by,
            approvers=approvers,
        )
    requested_at = event["requested_at"]
    message = {"decision": decision, "by": by, "comment": comment, "at": now_ms(),
               "requested_at": requested_at}
    DBOS.send(workflow_id, message, topic=event_key(gate),
              idempotency_key=f"durapipe:{workflow_id}:{event_key(gate)}:{requested_at}")
