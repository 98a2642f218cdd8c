"""Lists of runs as one indexed, keyset-paged query (Postgres), for ``durapipe runs`` and the
console's runs list.

A page walks durapipe's run keys (``durapipe.run_keys``, ``sql/keys.sql``) backwards along
the index of its filters (app, pipeline, creation time) from the cursor, the last row of
the previous page: page 1000 costs what page 1 costs, and a filter on pipeline never reads
the other pipelines' runs or parses a recorded input. Filters are parameters, never pasted
into the SQL. Where there are no run keys (SQLite, or a database no current App launched
on yet) :func:`page` returns None and callers list through DBOS's API instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..audit import RunInfo, first_line, redact
from ..errors import OperatorError

# The recorded error is read for the runs that did not succeed only: a page of successful
# runs reads one row of DBOS's per run, not two.
_SELECT = """
SELECT k.workflow_id, s.status, s.created_at, s.completed_at, s.executor_id,
       s.application_version, s.forked_from, k.pipeline,
       CASE WHEN s.status <> 'SUCCESS' THEN (SELECT wo.error FROM dbos.workflow_output wo
                                             WHERE wo.workflow_uuid = k.workflow_id) END,
       s.queue_name, k.app, s.attributes->>'durapipe.tenant'
FROM durapipe.run_keys k
JOIN dbos.workflow_status s ON s.workflow_uuid = k.workflow_id
WHERE k.parent_workflow_id IS NULL"""

# One condition per filter, in the query only when the filter is set: each combination of
# filters is its own statement, planned for what it filters on (a generic plan of a
# "$1 IS NULL OR ..." statement reads every run). status, app and pipeline are columns of
# the run keys, each combination indexed with created (sql/keys.sql).
_FILTERS = {
    "app": "k.app = %(app)s::text",
    "pipeline": "k.pipeline = %(pipeline)s::text",
    "status": "k.status = %(status)s::text",
    "tenant": "s.attributes @> jsonb_build_object('durapipe.tenant', %(tenant)s::text)",
    "since": "k.created >= to_timestamp(%(since)s::bigint / 1000.0)",
    "until": "k.created < to_timestamp(%(until)s::bigint / 1000.0)",
    "c_at": "k.created <= to_timestamp(%(c_at)s::bigint / 1000.0)\n  AND (k.created, k.workflow_id)"
            " < (to_timestamp(%(c_at)s::bigint / 1000.0), %(c_id)s::text)",
    "text": "EXISTS (SELECT 1 FROM dbos.workflow_input i WHERE i.workflow_uuid = k.workflow_id\n"
            "              AND i.inputs ILIKE %(text)s::text ESCAPE '\\')",
}
_ORDER = "\nORDER BY k.created DESC, k.workflow_id DESC\nLIMIT %(limit)s\n"


@dataclass(frozen=True)
class RunQuery:
    """Which runs, newest first: every field optional; ``cursor`` is ``<created_ms>:<run id>``
    of the last run of the previous page; ``text`` is found in the run's inputs; ``tenant``
    is the one a run was started for."""

    app: str | None = None
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
            "app": self.app, "status": self.status.upper() if self.status else None,
            "since": int(self.since.timestamp() * 1000) if self.since else None,
            "until": int(self.until.timestamp() * 1000) if self.until else None,
            "c_at": c_at, "c_id": c_id, "pipeline": self.pipeline or None, "text": text,
            "limit": limit, "tenant": self.tenant or None,
        }

    def sql(self) -> str:
        """The page query for the filters that are set (parameters: :meth:`params`)."""
        params = self.params(0)
        return _SELECT + "".join(f"\n  AND {cond}" for key, cond in _FILTERS.items()
                                 if params[key] is not None) + _ORDER


def error_line(raw: str | None) -> str | None:
    """A recorded error (portable JSON ``{"name", "message"}``) as ``Name: message``."""
    import json

    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(doc, dict):
        return ": ".join(str(doc[k]) for k in ("name", "message") if doc.get(k))
    return str(doc)


def _info(row: tuple[Any, ...]) -> RunInfo:
    wid, status, created, completed, executor, version, forked, pipeline, error, queue, app, tenant = row
    active = status in ("PENDING", "ENQUEUED", "DELAYED")
    duration = (completed - created) if completed and created and not active else None
    return RunInfo(run_id=wid, pipeline=pipeline, status=status, created_ms=created,
                   duration_ms=duration, error=error_line(error), executor_id=executor,
                   queue=queue, app=app, app_version=version, forked_from=forked,
                   tenant=tenant)


def page(url: str, query: RunQuery, limit: int) -> tuple[list[RunInfo], str | None] | None:
    """One page of runs and the cursor of the next (None at the end); None when the
    database has no run keys (see the module docstring)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return None
    import psycopg

    params = query.params(limit + 1)
    try:
        with psycopg.connect(url, connect_timeout=10) as con:
            if con.execute("SELECT to_regclass('durapipe.run_keys')").fetchone() == (None,):
                return None
            found = con.execute(query.sql(), params).fetchall()
    except psycopg.OperationalError as exc:
        raise OperatorError(f"cannot reach database {redact(url)}: {first_line(exc)}",
                            url=redact(url)) from None
    runs = [_info(r) for r in found[:limit]]
    nxt = f"{runs[-1].created_ms}:{runs[-1].run_id}" if len(found) > limit and runs else None
    return runs, nxt


__all__ = ["RunQuery", "error_line", "page"]
