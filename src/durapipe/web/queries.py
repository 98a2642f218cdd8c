"""The console's runs list: one keyset-paged query over DBOS's tables.

A page walks ``dbos.workflow_status`` backwards along its ``created_at`` index from the
cursor (the last row of the previous page), so page 1000 costs what page 1 costs at any
number of runs. Filters are parameters, never pasted into the SQL. On SQLite the list
comes from :meth:`Admin.list_runs` (no text search, first page only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..audit import RunInfo, first_line, redact
from ..engine.admin import Admin
from ..errors import OperatorError

RUN_WORKFLOW = "durapipe.run"
STATUSES = ("PENDING", "ENQUEUED", "DELAYED", "SUCCESS", "ERROR", "CANCELLED",
            "MAX_RECOVERY_ATTEMPTS_EXCEEDED")

PAGE_SQL = """
SELECT s.workflow_uuid, s.status, s.created_at, s.completed_at, s.executor_id,
       s.application_version, s.forked_from, wi.inputs, wo.error,
       s.attributes->>'durapipe.tenant' 
FROM dbos.workflow_status s
-- OFFSET 0 keeps the input lookup per run: the filters on inputs never drive the plan,
-- the created_at index does (a JSON filter's selectivity is a guess the planner gets wrong).
LEFT JOIN LATERAL (SELECT i.inputs FROM dbos.workflow_input i
                   WHERE i.workflow_uuid = s.workflow_uuid OFFSET 0) wi ON true
LEFT JOIN dbos.workflow_output wo ON wo.workflow_uuid = s.workflow_uuid
WHERE s.name = %(name)s AND s.parent_workflow_id IS NULL
  AND s.application_name IS NOT NULL AND s.application_name = %(app)s::text
  AND (%(status)s::text IS NULL OR s.status = %(status)s::text)
  AND (%(since)s::bigint IS NULL OR s.created_at >= %(since)s::bigint)
  AND (%(until)s::bigint IS NULL OR s.created_at < %(until)s::bigint)
  AND (%(c_at)s::bigint IS NULL OR s.created_at < %(c_at)s::bigint
       OR (s.created_at = %(c_at)s::bigint AND s.workflow_uuid < %(c_id)s::text))
  AND (%(c_at)s::bigint IS NULL OR s.created_at <= %(c_at)s::bigint)
  AND (%(pipeline)s::text IS NULL
       OR (wi.inputs::jsonb #>> '{positionalArgs,0}') = %(pipeline)s::text)
  AND (%(text)s::text IS NULL OR wi.inputs ILIKE %(text)s::text ESCAPE '\\')
  AND (%(tenant)s::text IS NULL OR s.attributes @> jsonb_build_object('durapipe.tenant', %(tenant)s::text))
ORDER BY s.created_at DESC, s.workflow_uuid DESC
LIMIT %(limit)s
"""


@dataclass(frozen=True)
class RunFilter:
    """What the runs list shows: the runs of app ``app`` (its DBOS name; see
    :mod:`durapipe.engine.scope`), every other field optional; ``cursor`` is
    ``<created_ms>:<run id>``."""

    app: str
    pipeline: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    text: str | None = None
    cursor: str | None = None
    tenant: str | None = None

    def params(self, limit: int) -> dict[str, Any]:
        c_at: int | None = None
        c_id: str | None = None
        if self.cursor:
            at, sep, rid = self.cursor.partition(":")
            if not sep or not at.isdigit():
                raise OperatorError(f"page cursor {self.cursor!r}: expected <created_ms>:<run id>")
            c_at, c_id = int(at), rid
        text = None
        if self.text:
            text = "%" + self.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return {
            "name": RUN_WORKFLOW, "app": self.app, "status": self.status.upper() if self.status else None,
            "since": int(self.since.timestamp() * 1000) if self.since else None,
            "until": int(self.until.timestamp() * 1000) if self.until else None,
            "c_at": c_at, "c_id": c_id, "pipeline": self.pipeline or None, "text": text,
            "limit": limit, "tenant": self.tenant or None,
        }


def _error(raw: str | None) -> str | None:
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(doc, dict):
        return ": ".join(str(doc[k]) for k in ("name", "message") if doc.get(k))
    return str(doc)


def _row(row: tuple[Any, ...]) -> RunInfo:
    wid, status, created, completed, executor, version, forked, inputs, error, tenant = row
    pipeline = None
    try:
        args = json.loads(inputs).get("positionalArgs") if inputs else None
        pipeline = str(args[0]) if args else None
    except (ValueError, AttributeError, TypeError):
        pass
    active = status in ("PENDING", "ENQUEUED", "DELAYED")
    duration = (completed - created) if completed and created and not active else None
    return RunInfo(run_id=wid, pipeline=pipeline, status=status, created_ms=created,
                   duration_ms=duration, error=_error(error), executor_id=executor, queue=None,
                   app=None, app_version=version, forked_from=forked, tenant=tenant)


def list_page(admin: Admin, flt: RunFilter, limit: int = 50) -> tuple[list[RunInfo], str | None]:
    """One page of runs, newest first, and the cursor of the next page (None at the end)."""
    if flt.status and flt.status.upper() not in STATUSES:
        raise OperatorError(f"status {flt.status!r}: use one of {', '.join(STATUSES)}")
    if not admin.url.startswith(("postgresql://", "postgres://")):
        rows = admin.list_runs(pipeline=flt.pipeline, status=flt.status, since=flt.since, limit=limit,
                               tenant=flt.tenant)
        return [r for r in rows if r.app is not None and r.app == flt.app], None
    import psycopg

    try:
        with psycopg.connect(admin.url, connect_timeout=10) as con:
            found = con.execute(PAGE_SQL, flt.params(limit + 1)).fetchall()
    except psycopg.OperationalError as exc:
        raise OperatorError(f"cannot reach database {redact(admin.url)}: {first_line(exc)}") from None
    runs = [_row(r) for r in found[:limit]]
    nxt = f"{runs[-1].created_ms}:{runs[-1].run_id}" if len(found) > limit and runs else None
    return runs, nxt


__all__ = ["PAGE_SQL", "STATUSES", "RunFilter", "list_page"]
