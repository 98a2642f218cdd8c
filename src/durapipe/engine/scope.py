"""Which app a run belongs to, and which run ids and names an app accepts.

Several apps may share one database. Every app-scoped read and write (``get_run``,
``approve``/``reject``, ``pending``, ``progress``, starting a run under an existing id)
asks :func:`belongs_to` (Python) or :func:`owned_by` (SQL), and nothing else, whether a
workflow is one of the app's. Both compare the owner DBOS records on every workflow row it
writes (``workflow_status.application_name``: the app's DBOS name, inherited by child
workflows and forks) for equality with the app's: never a prefix, and a row with no owner
belongs to no app. App ``shop`` therefore never sees the runs of ``shop-eu``.

Run ids, gate names, approver names and comments are checked here too, before anything
reaches the database, so a bad one is a one-line :class:`~durapipe.errors.DurapipeError`
instead of a driver error with SQL in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..errors import DurapipeError, UnknownRun

WORKFLOW_NAME = "durapipe.run"
"""The DBOS workflow of the subtrees of a run (and of every run recorded before runs were
named by pipeline): recorded workflows name it, never change it."""

RUN_PREFIX = "durapipe.run:"
"""A run of pipeline ``P`` is the DBOS workflow ``durapipe.run:P`` (:func:`run_workflow_name`),
so DBOS's own tools (``dbos workflow list -n``, its console, ``DBOS.list_workflows(name=)``)
tell pipelines apart."""

TASK_WORKFLOW = "durapipe.task"
"""The DBOS workflow of a dispatched background task (``engine/dispatch.py``)."""

DURAPIPE_WORKFLOWS = (WORKFLOW_NAME, TASK_WORKFLOW)
"""The fixed workflows durapipe registers: subtrees and background tasks (runs are also
``durapipe.run:<pipeline>``; :func:`named_one_of` accepts those where ``durapipe.run`` is)."""


def run_workflow_name(pipeline: str) -> str:
    """The DBOS workflow name of the runs of ``pipeline``."""
    return RUN_PREFIX + pipeline


def is_run_workflow(name: Any) -> bool:
    """True for the DBOS name of a run or of one of its subtrees."""
    return isinstance(name, str) and (name == WORKFLOW_NAME or name.startswith(RUN_PREFIX))


def named_one_of(name: Any, kinds: tuple[str, ...]) -> bool:
    """Is a workflow named ``name`` one of ``kinds``? ``durapipe.run`` among them stands
    for every run workflow, ``durapipe.run:<pipeline>`` included."""
    return name in kinds or (WORKFLOW_NAME in kinds and is_run_workflow(name))


def run_names_sql(column: Any) -> Any:
    """The SQL condition of :func:`is_run_workflow` on a ``workflow_status.name`` column."""
    return sa.or_(column == WORKFLOW_NAME, column.like(RUN_PREFIX + "%"))

MAX_RUN_ID = 200
"""Longest run id, in characters: child workflow ids (``<run>/<path>:<name>``) extend it,
and Postgres indexes entries of at most ~2,700 bytes."""

MAX_NAME = 200
"""Longest gate name or approver name, in characters."""

MAX_COMMENT = 10_000
"""Longest comment on a gate decision, in characters."""


@dataclass(frozen=True)
class Owner:
    """What an operation on recorded runs needs of an app: its name (for messages) and its
    DBOS name (what its workflow rows record as their owner)."""

    name: str
    dbos_name: str


def app_of(status: Any) -> str | None:
    """The DBOS name of the app that owns a workflow (a DBOS ``WorkflowStatus`` or a row
    with an ``application_name``), or None when the row names no owner."""
    owner = getattr(status, "application_name", None)
    return owner if isinstance(owner, str) and owner else None


def belongs_to(dbos_name: str, status: Any) -> bool:
    """True when the workflow ``status`` describes is one of app ``dbos_name``'s."""
    return status is not None and app_of(status) == dbos_name


def owned_by(column: Any, dbos_name: Any) -> Any:
    """The SQL condition of :func:`belongs_to` on a ``workflow_status.application_name``
    column (``dbos_name`` a value or a bind parameter); NULL never matches."""
    return sa.and_(column.is_not(None), column == dbos_name)


def _shown(text: str) -> str:
    """``text`` shortened and with NUL and lone surrogates escaped, safe to print and store."""
    short = text if len(text) <= 60 else text[:60] + "..."
    return short.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def bad_text(value: Any, limit: int) -> str | None:
    """Why ``value`` cannot be stored as a name or id (None when it can)."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > limit:
        return f"has {len(value)} characters; at most {limit} are allowed"
    if "\x00" in value:
        return "contains a NUL character (\\x00)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate ({value[exc.start]!r} at index {exc.start})"
    return None


def check_run_id(run_id: Any, where: str, *, new: bool = False) -> str:
    """Refuse a run id that is not a non-empty string of at most ``MAX_RUN_ID`` characters
    without NUL or lone surrogates: UnknownRun for a lookup (no run can have it), a
    DurapipeError for a new run (``new``)."""
    why = bad_text(run_id, MAX_RUN_ID)
    if why is not None:
        shown = f"'{_shown(run_id)}'" if isinstance(run_id, str) else repr(run_id)[:60]
        # A lookup by an id no run can have finds no run; a new run is refused outright.
        cls = DurapipeError if new else UnknownRun
        raise cls(f"{where + ': ' if where else ''}run id {shown} {why}; a run id is a string "
                  f"of 1 to {MAX_RUN_ID} characters without NUL or lone surrogates, e.g. 'post-42'",
                  run_id=shown)
    return str(run_id)


def check_name(value: Any, what: str, where: str, limit: int = MAX_NAME,
               optional: bool = False) -> None:
    """Refuse a gate name, approver or comment that cannot be stored."""
    if optional and value is None:
        return
    why = bad_text(value, limit)
    if why is not None:
        shown = f"'{_shown(value)}'" if isinstance(value, str) else repr(value)[:60]
        raise DurapipeError(f"{where}: {what} {shown} {why}", value=shown)


def refuse(app_name: str, run_id: str) -> UnknownRun:
    """The error for a run id that is not one of the app's (whoever else may own it)."""
    return UnknownRun(f"app {app_name!r} has no run with id '{_shown(run_id)}'", run_id=_shown(run_id))


def check_run(owner: Owner, run_id: str, status: Any,
              kinds: tuple[str, ...] = (WORKFLOW_NAME,)) -> None:
    """Raise UnknownRun unless ``status`` is a workflow of one of ``kinds`` of the app."""
    if status is None or not named_one_of(status.name, kinds) or not belongs_to(owner.dbos_name, status):
        raise refuse(owner.name, run_id)
