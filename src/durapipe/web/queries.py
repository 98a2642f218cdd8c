"""The console's runs list: one keyset-paged query over durapipe's indexed run keys
(:mod:`durapipe.engine.runlist`, shared with ``durapipe runs``), so page 1000 costs what
page 1 costs at any number of runs. On SQLite the list comes from :meth:`Admin.list_runs`
(no text search, first page only).
"""

from __future__ import annotations

from ..audit import RunInfo
from ..engine.admin import Admin
from ..engine.runlist import RunQuery, page
from ..errors import OperatorError

STATUSES = ("PENDING", "ENQUEUED", "DELAYED", "SUCCESS", "ERROR", "CANCELLED",
            "MAX_RECOVERY_ATTEMPTS_EXCEEDED")

RunFilter = RunQuery
"""What the runs list shows: the runs of app ``app`` (its DBOS name; see
:mod:`durapipe.engine.scope`), every other field optional."""


def list_page(admin: Admin, flt: RunFilter, limit: int = 50) -> tuple[list[RunInfo], str | None]:
    """One page of runs, newest first, and the cursor of the next page (None at the end)."""
    if flt.status and flt.status.upper() not in STATUSES:
        raise OperatorError(f"status {flt.status!r}: use one of {', '.join(STATUSES)}")
    found = page(admin.url, flt, limit)
    if found is None:
        rows = admin.list_runs(pipeline=flt.pipeline, status=flt.status, since=flt.since, limit=limit,
                               tenant=flt.tenant)
        return [r for r in rows if r.app is not None and r.app == flt.app], None
    return found


__all__ = ["STATUSES", "RunFilter", "list_page"]
