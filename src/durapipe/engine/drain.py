"""Operator reads for deploys: the drain report and the pre-deploy compatibility check.

>>> shapes, waiting = drain_report("postgresql://localhost/app")      # `durapipe versions`
>>> check_compat("postgresql://localhost/app", app)                    # `durapipe check-compat`
>>> check_manifests(export_manifests(deployed_app), new_app)           # ... --manifest FILE

The first two read Postgres (``durapipe.shapes``, ``durapipe.waiting`` and DBOS's tables)
and need no launched App; the checks take the App of the code about to be deployed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..audit import first_line, redact
from ..errors import OperatorError
from ..manifest import Frontier, compare
from . import versions

if TYPE_CHECKING:
    from .app import App

ACTIVE = ("PENDING", "ENQUEUED", "DELAYED")

# Every unfinished run with its pipeline, shape and what it is doing now.
_ACTIVE_RUNS = """
SELECT s.workflow_uuid, s.application_name, s.status, s.executor_id,
       (i.inputs::jsonb)->'positionalArgs'->>0 AS pipeline,
       (i.inputs::jsonb)->'positionalArgs'->>1 AS shape,
       EXISTS (SELECT 1 FROM dbos.workflow_events e
               WHERE (e.workflow_uuid = s.workflow_uuid OR e.workflow_uuid LIKE s.workflow_uuid || '/%')
                 AND CASE WHEN e.key LIKE 'gate:%' THEN (e.value::jsonb)->>'status' END = 'waiting')
         AS at_gate,
       (SELECT o.function_name FROM dbos.operation_outputs o WHERE o.workflow_uuid = s.workflow_uuid
        ORDER BY o.function_id DESC LIMIT 1) = 'DBOS.sleep' AS sleeping,
       (SELECT min(w.node) FROM durapipe.waiting w WHERE w.run_id = s.workflow_uuid) AS waiting_node,
       (SELECT min(w.reason) FROM durapipe.waiting w WHERE w.run_id = s.workflow_uuid) AS reason,
       s.status = 'ENQUEUED' AND starts_with(s.queue_name, 'durapipe-shape-') AS handed
FROM dbos.workflow_status s
JOIN dbos.workflow_input i ON i.workflow_uuid = s.workflow_uuid
WHERE (s.name = 'durapipe.run' OR s.name LIKE 'durapipe.run:%') AND s.parent_workflow_id IS NULL
  AND s.status IN ('PENDING', 'ENQUEUED', 'DELAYED')
ORDER BY s.created_at
"""


@dataclass(frozen=True)
class ActiveRun:
    run_id: str
    app: str
    pipeline: str
    shape: str
    status: str
    executor_id: str | None
    doing: str  # waiting (for a worker with its shape), gate, sleeping or running
    waiting_node: str | None
    reason: str | None


@dataclass(frozen=True)
class ShapeRow:
    app: str
    pipeline: str
    shape: str
    first_seen: str | None
    last_seen: str | None
    running: int
    gate: int
    sleeping: int
    waiting: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def connect(url: str) -> sa.Engine:
    if not url.startswith(("postgresql://", "postgres://")):
        raise OperatorError(f"deploy records need Postgres; {redact(url)} is not a postgresql:// URL",
                            url=redact(url))
    return sa.create_engine(url.replace("postgres://", "postgresql://", 1)
                            .replace("postgresql://", "postgresql+psycopg://", 1), pool_size=1)


def _run(url: str, work: Any) -> Any:
    engine = connect(url)
    try:
        with engine.begin() as con:
            if con.execute(sa.text("SELECT to_regclass('dbos.workflow_status')")).scalar() is None:
                raise OperatorError(f"{redact(url)} has no DBOS tables: no durapipe App ran on it",
                                    url=redact(url))
            versions.ensure_schema(con)
            return work(con)
    except sa.exc.OperationalError as exc:
        raise OperatorError(f"cannot reach database {redact(url)}: {first_line(exc)}",
                            url=redact(url)) from None
    finally:
        engine.dispose()


def _active(con: sa.Connection) -> list[ActiveRun]:
    out = []
    for r in con.execute(sa.text(_ACTIVE_RUNS)).all():
        reason = r.reason or (f"handed over to the processes with shape {r.shape}, none of "
                              "which has taken it yet" if r.handed else None)
        doing = ("waiting" if r.waiting_node is not None or reason is not None else
                 "gate" if r.at_gate else "sleeping" if r.sleeping else "running")
        out.append(ActiveRun(r.workflow_uuid, r.application_name or "", r.pipeline or "",
                             r.shape or "", r.status, r.executor_id, doing, r.waiting_node, reason))
    return out


def drain_report(url: str) -> tuple[list[ShapeRow], list[ActiveRun]]:
    """Every shape seen, with its unfinished runs counted by what they do; and the runs
    waiting for a worker with their shape."""

    def work(con: sa.Connection) -> tuple[list[ShapeRow], list[ActiveRun]]:
        shapes = con.execute(sa.text(
            "SELECT app, pipeline, shape, first_seen, last_seen FROM durapipe.shapes "
            "ORDER BY app, pipeline, first_seen")).all()
        runs = _active(con)
        counts: dict[tuple[str, str, str], dict[str, int]] = {}
        for run in runs:
            c = counts.setdefault((run.app, run.pipeline, run.shape), {})
            c[run.doing] = c.get(run.doing, 0) + 1
        rows, seen = [], set()
        for app, pipeline, shape, first, last in shapes:
            c = counts.get((app, pipeline, shape), {})
            seen.add((app, pipeline, shape))
            rows.append(ShapeRow(app, pipeline, shape, f"{first:%Y-%m-%d %H:%M:%S}",
                                 f"{last:%Y-%m-%d %H:%M:%S}", c.get("running", 0),
                                 c.get("gate", 0), c.get("sleeping", 0), c.get("waiting", 0)))
        for key, c in counts.items():  # runs of shapes recorded before manifests existed
            if key not in seen:
                rows.append(ShapeRow(*key, None, None, c.get("running", 0), c.get("gate", 0),
                                     c.get("sleeping", 0), c.get("waiting", 0)))
        return rows, [r for r in runs if r.doing == "waiting"]

    result: tuple[list[ShapeRow], list[ActiveRun]] = _run(url, work)
    return result


def check_compat(url: str, app: App) -> list[dict[str, Any]]:
    """What ``app``'s code would do with each unfinished run of its pipelines: continue it
    (``"continue"``) or leave it waiting for a worker with its shape (``"wait"``)."""

    def work(con: sa.Connection) -> list[dict[str, Any]]:
        out = []
        for run in _active(con):
            reg = app.pipelines.get(run.pipeline)
            if run.app != app.dbos_name or reg is None:
                continue
            verdict = versions.judge(con, "dbos", app.dbos_name, reg, run.shape, run.run_id,
                                     "0", run.run_id)
            out.append({"run_id": run.run_id, "pipeline": run.pipeline, "shape": run.shape,
                        "new_shape": reg.version, "status": run.status, "doing": run.doing,
                        "verdict": "continue" if verdict.compatible else "wait",
                        "node": verdict.node, "frontier": verdict.frontier,
                        "reason": verdict.reason})
        return out

    result: list[dict[str, Any]] = _run(url, work)
    return result


def waiting_runs_of(url: str, shape: str) -> list[str]:
    """The runs waiting for a worker with shape ``shape`` (to retire it)."""

    def work(con: sa.Connection) -> list[str]:
        rows = con.execute(sa.text(
            "SELECT DISTINCT w.run_id FROM durapipe.waiting w JOIN dbos.workflow_status s "
            "ON s.workflow_uuid = w.run_id WHERE w.shape = :shape AND s.status IN "
            "('PENDING', 'ENQUEUED', 'DELAYED') ORDER BY 1"), {"shape": shape}).all()
        return [str(r[0]) for r in rows]

    result: list[str] = _run(url, work)
    return result


def forget_waiting(url: str, run_ids: list[str]) -> None:
    _run(url, lambda con: con.execute(sa.text("DELETE FROM durapipe.waiting WHERE run_id = ANY(:ids)"),
                                      {"ids": run_ids}))


def export_manifests(app: App) -> dict[str, Any]:
    """The shapes and manifests of ``app``'s pipelines, for ``check-compat --manifest``."""
    return {"app": app.dbos_name,
            "pipelines": {reg.name: {"shape": reg.version, "manifest": versions.current_manifest(reg)}
                          for reg in app.pipelines.values()}}


def check_manifests(recorded: dict[str, Any], app: App) -> list[dict[str, Any]]:
    """Without a database: for each pipeline of an exported file (the code deployed now),
    the first node where a run of it would stop being continued by ``app``'s code.

    A run whose frontier lies before ``wait_from`` continues on the new code; a run that
    reached it or went past it waits for a worker with its shape.
    """
    pipelines = recorded.get("pipelines") if isinstance(recorded, dict) else None
    if not isinstance(pipelines, dict):
        raise OperatorError("the manifest file must be the JSON of `durapipe versions export`")
    out = []
    for name, doc in sorted(pipelines.items()):
        reg = app.pipelines.get(name)
        if reg is None:
            out.append({"pipeline": name, "shape": doc["shape"], "new_shape": None,
                        "wait_from": "0", "reason": f"the new code has no pipeline {name!r}"})
            continue
        old, new = doc["manifest"], versions.current_manifest(reg)
        first = None
        paths = [e["path"] for e in old]
        leaves = [e for e in old if not any(p.startswith(e["path"] + ".") for p in paths)]
        for entry in leaves:   # a run's frontier is a node that records an operation
            for trailing in (False, True):
                verdict = compare(old, new, Frontier((entry["path"],), trailing))
                if not verdict.compatible:
                    first = verdict
                    break
            if first is not None:
                break
        out.append({"pipeline": name, "shape": doc["shape"], "new_shape": reg.version,
                    "wait_from": first.node if first else None,
                    "reason": first.reason if first else ""})
    return out
