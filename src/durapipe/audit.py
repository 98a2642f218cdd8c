"""Audit: the SQL views over DBOS's tables, and the records operators read.

>>> print(views_sql())                          # the DDL, also shipped as sql/views.sql
>>> install_views("postgresql://localhost/app")   # schema ``durapipe``: runs, steps, llm_calls, ...

:class:`RunInfo` and :class:`NodeRecord` are what ``durapipe runs`` / ``durapipe show`` print;
they are built from DBOS's API by :mod:`durapipe.engine.admin`, so they work on SQLite too.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from .errors import OperatorError

VIEWS = ("runs", "steps", "llm_calls", "background_tasks", "approvals", "step_logs", "versions")
_PATH_RE = re.compile(r"^(\d[\d.#]*):(.+)$")


def views_sql() -> str:
    """The SQL that creates the ``durapipe`` schema and its views (idempotent)."""
    return resources.files("durapipe").joinpath("sql/views.sql").read_text(encoding="utf-8")


def keys_sql() -> str:
    """durapipe's indexed keys of every workflow it runs (``durapipe.run_keys``) and the
    triggers that keep them; the views read them. Also run by every launched App."""
    return resources.files("durapipe").joinpath("sql/keys.sql").read_text(encoding="utf-8")


def versions_sql() -> str:
    """The deploy records (``durapipe.shapes``, ``durapipe.waiting``, view ``durapipe.versions``)."""
    return resources.files("durapipe").joinpath("sql/versions.sql").read_text(encoding="utf-8")


def install_views(database_url: str) -> None:
    """Create or replace the audit views in a Postgres database holding DBOS's tables."""
    if not database_url.startswith(("postgresql://", "postgres://")):
        raise OperatorError(
            f"the audit views need Postgres; {redact(database_url)} is not a postgresql:// URL",
            url=redact(database_url),
        )
    import psycopg

    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as con:
            if con.execute("SELECT to_regclass('dbos.operation_outputs')").fetchone() == (None,):
                raise OperatorError(
                    f"{redact(database_url)} has no DBOS tables (dbos.*): launch a durapipe "
                    "App on it once, then install the views", url=redact(database_url),
                )
            with con.transaction():
                con.execute("SELECT pg_advisory_xact_lock(hashtext('durapipe.versions'))")
                con.execute(keys_sql().encode())
                con.execute(versions_sql().encode())
            con.execute(views_sql().encode())
    except psycopg.OperationalError as exc:
        raise OperatorError(
            f"cannot reach database {redact(database_url)}: {first_line(exc)}",
            url=redact(database_url),
        ) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]+@", r"\1:***@", url)  # an empty password hides nothing


# -- records ---------------------------------------------------------------------------

def log_attempts(logged: dict[str, Any]) -> list[dict[str, Any]]:
    """A step's ``log:<step>`` event as one entry per attempt, oldest first: ``attempt``,
    ``records``, and ``error``/``traceback`` when that attempt failed (see
    ``engine/steplogs.py``). An event of a step run once is one attempt."""
    last = int(logged.get("attempt") or 1)
    failed = {int(f.get("attempt") or 0): f for f in logged.get("attempts") or [] if isinstance(f, dict)}
    if logged.get("error") is not None:
        failed[last] = {"error": logged.get("error"), "traceback": logged.get("traceback") or []}
    by_attempt: dict[int, list[dict[str, Any]]] = {}
    for rec in logged.get("records") or []:
        by_attempt.setdefault(int(rec.get("attempt") or last), []).append(rec)
    out = []
    for n in sorted(set(by_attempt) | set(failed)):
        entry: dict[str, Any] = {"attempt": n, "records": by_attempt.get(n, [])}
        if n in failed:
            entry.update(error=failed[n].get("error"), traceback=failed[n].get("traceback") or [])
        out.append(entry)
    return out


@dataclass
class RunInfo:
    """One run as ``durapipe runs`` lists it."""

    run_id: str
    pipeline: str | None
    status: str
    created_ms: int | None
    duration_ms: int | None
    error: str | None
    executor_id: str | None
    queue: str | None
    app: str | None
    app_version: str | None
    forked_from: str | None = None
    tenant: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeRecord:
    """One recorded operation of a run: a step, a child workflow (with its own nodes), a
    background task or a gate. ``kind`` is step | child | dbos-op | task | gate."""

    path: str | None
    name: str
    kind: str
    status: str
    started_ms: int | None = None
    duration_ms: int | None = None
    error: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    workflow_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    children: list[NodeRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def walk(self) -> list[NodeRecord]:
        out = [self]
        for c in self.children:
            out.extend(c.walk())
        return out


@dataclass
class RunTree:
    """A run with its recorded nodes in order; child workflows nest their own nodes."""

    run: RunInfo
    nodes: list[NodeRecord]
    output: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run.to_json(), "nodes": [n.to_json() for n in self.nodes],
                "output": self.output}

    def walk(self) -> list[NodeRecord]:
        out: list[NodeRecord] = []
        for n in self.nodes:
            out.extend(n.walk())
        return out

    @property
    def tokens(self) -> tuple[int, int]:
        nodes = self.walk()
        return (sum(n.input_tokens or 0 for n in nodes), sum(n.output_tokens or 0 for n in nodes))


def split_step_name(function_name: str) -> tuple[str | None, str, str]:
    """``"0.2:writer"`` -> (path, name, kind); DBOS's own operations keep their name."""
    m = _PATH_RE.match(function_name)
    if m:
        return m.group(1), m.group(2), "step"
    return None, function_name, "dbos-op"


def path_key(path: str | None) -> tuple[Any, ...]:
    """Sort key for node paths: ``0.10`` after ``0.9``; instance marks (``#2``) by number."""
    if path is None:
        return ((float("inf"), 0),)
    key: list[Any] = []
    for part in path.split("."):
        num, _, mark = part.partition("#")
        key.append((int(num) if num.isdigit() else 0, int(mark) if mark.isdigit() else -1))
    return tuple(key)


def model_usage(output: Any) -> tuple[str | None, int | None, int | None]:
    """Model name and token counts from what an agent step recorded, if it is a model call."""
    if isinstance(output, dict) and "model" in output and "input_tokens" in output:
        return (output.get("model"), _int(output.get("input_tokens")), _int(output.get("output_tokens")))
    return None, None, None


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
