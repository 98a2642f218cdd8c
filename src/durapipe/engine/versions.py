"""Deploys: the shapes an app has run, and what new code does with runs in flight.

Every process of an app line shares one DBOS application version
(:func:`application_version`), so every worker recovers every run. A recovered run whose
recorded shape differs from the code at hand is judged by :func:`reconcile`:

- unchanged up to its frontier (the last node it recorded): it continues on the new code;
- changed in a node it already passed or is inside: it is left PENDING, listed in
  ``durapipe.waiting`` (``durapipe versions``), and never failed automatically. Its
  execution parks: it looks every ``PARK_CHECK_SECONDS`` whether another execution took
  the run over, then hands over to DBOS's parking of a run it no longer owns (waiting for
  the outcome the other execution records), without replaying anything.

At launch (:func:`on_launch`) a process records its shapes in ``durapipe.shapes`` and takes
over the waiting runs it can run: their shape is its own, or they are compatible with it.
It claims each one only while the execution that parked it still owns it, and puts it on
a queue only processes with that shape listen to (:func:`shape_queue`; every App names
the queues it listens to, see ``listen.to_listen``).

The records live in Postgres (``sql/versions.sql``). On SQLite nothing is recorded: a run
of another shape is left PENDING, and a process with its shape and executor id resumes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

import sqlalchemy as sa
from dbos import DBOS
from dbos._error import DBOSWorkflowCancelledError

from ..audit import keys_sql, versions_sql
from ..errors import PipelineChanged
from ..manifest import Frontier, Manifest, Verdict, compare, manifest

if TYPE_CHECKING:
    from .app import App
    from .runs import Registered

log = logging.getLogger("durapipe.versions")
# How often a parked execution looks whether another execution took its run over.
PARK_CHECK_SECONDS = 30.0
_manifests: dict[tuple[str, str], Manifest] = {}


def application_version(app_name: str, line: str) -> str:
    """The DBOS application version of every process of app line ``line`` of an app.

    It depends on the app's name and line only, never on the code, so a deploy keeps it
    and the new processes recover the old ones' runs (deciding per run, see
    :func:`reconcile`). ``app_name`` is the App's DBOS name (``App.dbos_name``).
    """
    return f"durapipe-{app_name}-{line}"


def shape_queue(app_name: str, shape: str) -> str:
    """The queue on which runs waiting for pipeline shape ``shape`` are handed over."""
    return f"durapipe-shape-{app_name}-{shape}"


def current_manifest(reg: Registered) -> Manifest:
    key = (reg.name, reg.version)
    found = _manifests.get(key)
    if found is None:
        found = _manifests[key] = manifest(reg.node)
    return found


def _engine() -> tuple[sa.Engine, str] | None:
    """The launched DBOS's Postgres engine and system schema; None on SQLite."""
    from dbos._dbos import _get_dbos_instance
    from dbos._sys_db_postgres import PostgresSystemDatabase

    sys_db = getattr(_get_dbos_instance(), "_sys_db", None)
    if not isinstance(sys_db, PostgresSystemDatabase):
        return None
    return sys_db.engine, str(sys_db.schema or "dbos")


def _q(schema: str) -> str:
    return '"' + schema.replace('"', '""') + '"'


# -- records --------------------------------------------------------------------------

def ensure_schema(con: sa.Connection) -> None:
    con.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('durapipe.versions'))"))
    con.exec_driver_sql(versions_sql())


def record_shapes(con: sa.Connection, app_name: str, regs: list[Registered]) -> None:
    for reg in regs:
        con.execute(sa.text(
            "INSERT INTO durapipe.shapes (app, pipeline, shape, manifest) "
            "VALUES (:app, :pipeline, :shape, CAST(:manifest AS jsonb)) "
            "ON CONFLICT (app, pipeline, shape) DO UPDATE SET last_seen = now()"),
            {"app": app_name, "pipeline": reg.name, "shape": reg.version,
             "manifest": json.dumps(current_manifest(reg))})


def load_manifest(con: sa.Connection, app_name: str, pipeline: str, shape: str) -> Manifest | None:
    row = con.execute(sa.text(
        "SELECT manifest FROM durapipe.shapes WHERE app = :app AND pipeline = :pipeline "
        "AND shape = :shape"), {"app": app_name, "pipeline": pipeline, "shape": shape}).first()
    return None if row is None else list(row[0])


def operations(con: sa.Connection, schema: str, workflow_id: str) -> list[tuple[int, str, str | None]]:
    rows = con.execute(sa.text(
        f"SELECT function_id, function_name, child_workflow_id FROM {_q(schema)}.operation_outputs "
        "WHERE workflow_uuid = :id ORDER BY function_id"), {"id": workflow_id}).all()
    return [(int(r[0]), str(r[1]), r[2]) for r in rows]


def judge(con: sa.Connection, schema: str, app_name: str, reg: Registered, shape: str,
          workflow_id: str, path: str, root: str) -> Verdict:
    """May workflow ``workflow_id`` (recorded by ``shape``, running node ``path`` of run
    ``root``) continue on ``reg``?"""
    if shape == reg.version:
        return Verdict(True, frontier=path)
    old = load_manifest(con, app_name, reg.name, shape)
    if old is None:
        return Verdict(False, None, f"no manifest of shape {shape} is recorded, so what the "
                       "run has passed cannot be compared")
    frontier = Frontier.from_operations(operations(con, schema, workflow_id), root)
    return compare(old, current_manifest(reg), frontier, path)


def changed_message(run: str, pipeline: str, recorded: str, current: str, verdict: Verdict) -> str:
    return (f"run {run} of pipeline {pipeline!r} was recorded by shape {recorded}, and this "
            f"process registers shape {current}: {verdict.reason}. Replaying its history on "
            f"this code is refused; the run stays PENDING until a worker with shape {recorded} "
            "takes it over (start one with the old code: it does so at launch). `durapipe "
            f"versions` lists waiting runs; `durapipe versions retire {recorded} --cancel` "
            "cancels them")


# -- in a workflow --------------------------------------------------------------------

async def reconcile(app: App, reg: Registered, recorded: str, path: str, root: str) -> None:
    """Continue a workflow recorded by shape ``recorded`` on ``reg``, or leave it waiting.

    Returns when it may continue; otherwise records it as waiting and raises DBOS's
    cancellation signal, on which DBOS parks this execution without recording an outcome.
    """
    workflow_id = DBOS.workflow_id or root
    found = _engine()
    if found is None:
        verdict = Verdict(False, None, "no manifests are recorded on SQLite")
    else:
        engine, schema = found
        verdict = await asyncio.to_thread(_judge_now, engine, schema, app, reg, recorded,
                                          workflow_id, path, root)
    if verdict.compatible:
        log.info("run %s of pipeline %r continues on shape %s (recorded by %s, frontier %s)",
                 root, reg.name, reg.version, recorded, verdict.frontier)
        return
    error = PipelineChanged(changed_message(root, reg.name, recorded, reg.version, verdict),
                            pipeline=reg.name, recorded=recorded, current=reg.version,
                            node=verdict.node, run_id=root)
    log.warning("%s", error.message)
    if found is not None:
        owner = await asyncio.to_thread(_park, found[0], found[1], app.dbos_name, reg, recorded,
                                        workflow_id, path, root, verdict, error.message)
        # Hold the execution here, looking every PARK_CHECK_SECONDS whether another one took
        # the run over (or it was cancelled): DBOS's own parking polls each second.
        while await asyncio.to_thread(_still_parked, found[0], found[1], workflow_id, owner):
            await asyncio.sleep(PARK_CHECK_SECONDS)
    raise DBOSWorkflowCancelledError(error.message)


def _still_parked(engine: sa.Engine, schema: str, workflow_id: str, owner: str | None) -> bool:
    with engine.begin() as con:
        row = con.execute(sa.text(
            f"SELECT status, owner_xid FROM {_q(schema)}.workflow_status WHERE workflow_uuid = :id"),
            {"id": workflow_id}).first()
    return row is not None and row[0] == "PENDING" and row[1] == owner


def _judge_now(engine: sa.Engine, schema: str, app: App, reg: Registered, recorded: str,
               workflow_id: str, path: str, root: str) -> Verdict:
    with engine.begin() as con:
        ensure_schema(con)  # a run recovered before this process's launch created the tables
        verdict = judge(con, schema, app.dbos_name, reg, recorded, workflow_id, path, root)
        if verdict.compatible:
            con.execute(sa.text("DELETE FROM durapipe.waiting WHERE workflow_id = :id"),
                        {"id": workflow_id})
            if path == "0":
                try:
                    with con.begin_nested():
                        _adopt(con, schema, workflow_id, recorded, reg.version)
                except sa.exc.DBAPIError as exc:  # a DBOS whose workflow_input differs
                    log.warning("run %s continues on shape %s, but its input could not name it "
                                "(%s): a rollback judges it against shape %s", root, reg.version,
                                exc.orig, recorded)
        return verdict


def _adopt(con: sa.Connection, schema: str, run_id: str, recorded: str, shape: str) -> None:
    """Make the run's input name the shape it now runs as; remember the one it started by.

    From here on its history is that shape's (unchanged up to the frontier, new after it),
    so a later recovery, a rollback included, is judged against that shape.
    """
    con.execute(sa.text(
        "INSERT INTO durapipe.adopted (run_id, started_by, running_as) VALUES (:id, :old, :new) "
        "ON CONFLICT (run_id) DO UPDATE SET running_as = EXCLUDED.running_as, since = now()"),
        {"id": run_id, "old": recorded, "new": shape})
    con.execute(sa.text(
        f"UPDATE {_q(schema)}.workflow_input SET inputs = jsonb_set(inputs::jsonb, "
        "'{positionalArgs,1}', to_jsonb(CAST(:new AS text)))::text WHERE workflow_uuid = :id"),
        {"id": run_id, "new": shape})


def _park(engine: sa.Engine, schema: str, app_name: str, reg: Registered, recorded: str,
          workflow_id: str, path: str, root: str, verdict: Verdict, reason: str) -> str | None:
    """Record the workflow as waiting; return the owner token of this execution."""
    with engine.begin() as con:
        ensure_schema(con)
        owner = con.execute(sa.text(
            f"SELECT executor_id, owner_xid FROM {_q(schema)}.workflow_status "
            "WHERE workflow_uuid = :id"), {"id": workflow_id}).first()
        con.execute(sa.text(
            "INSERT INTO durapipe.waiting (workflow_id, run_id, app, pipeline, shape, path, node, "
            "reason, seen_by, executor_id, owner_xid) VALUES (:id, :run, :app, :pipeline, :shape, "
            ":path, :node, :reason, :seen_by, :executor, :owner) ON CONFLICT (workflow_id) DO "
            "UPDATE SET node = EXCLUDED.node, reason = EXCLUDED.reason, seen_by = EXCLUDED.seen_by, "
            "executor_id = EXCLUDED.executor_id, owner_xid = EXCLUDED.owner_xid, since = now()"),
            {"id": workflow_id, "run": root, "app": app_name, "pipeline": reg.name,
             "shape": recorded, "path": path, "node": verdict.node, "reason": reason,
             "seen_by": reg.version, "executor": owner[0] if owner else None,
             "owner": owner[1] if owner else None})
    return str(owner[1]) if owner and owner[1] is not None else None


# -- patched markers -----------------------------------------------------------------

_markers: dict[tuple[str, str, str, str], bool] = {}


def has_marker(app_name: str, pipeline: str, shape: str, name: str) -> bool:
    """Does shape ``shape`` of a pipeline have a ``patched`` marker named ``name``?

    False when its manifest is not recorded (SQLite, or a shape from before manifests).
    """
    key = (app_name, pipeline, shape, name)
    if key not in _markers:
        found = _engine()
        old = None
        if found is not None:
            with found[0].begin() as con:
                ensure_schema(con)
                old = load_manifest(con, app_name, pipeline, shape)
        _markers[key] = any(e["kind"] == "patched" and e["name"] == name for e in old or ())
    return _markers[key]


def started_by(run_id: str) -> str | None:
    """The shape run ``run_id`` was started by: its workflow's second argument, unless it
    continued on another shape (:func:`_adopt`). None on SQLite."""
    found = _engine()
    if found is None:
        return None
    engine, schema = found
    with engine.begin() as con:
        ensure_schema(con)
        adopted = con.execute(sa.text("SELECT started_by FROM durapipe.adopted WHERE run_id = :id"),
                              {"id": run_id}).first()
        if adopted is not None:
            return str(adopted[0])
        row = con.execute(sa.text(
            f"SELECT inputs FROM {_q(schema)}.workflow_input WHERE workflow_uuid = :id"),
            {"id": run_id}).first()
    if row is None:
        return None
    try:
        args = json.loads(row[0])["positionalArgs"]
        return str(args[1])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


# -- at launch ------------------------------------------------------------------------

def on_launch(app: App) -> list[str]:
    """Record this process's shapes; take over the waiting runs it can run (unless
    ``app.take_over_waiting`` is False: a short-lived command's process). Returns their ids."""
    found = _engine()
    if found is None:
        return []
    engine, schema = found
    regs = list(app.pipelines.values())
    with engine.begin() as con:
        ensure_schema(con)
        if schema == "dbos":  # the indexed run keys the views and `runs` read (sql/keys.sql)
            con.exec_driver_sql(keys_sql())
        record_shapes(con, app.dbos_name, regs)
    if not app.take_over_waiting:
        return []
    with engine.begin() as con:
        waiting = con.execute(sa.text(
            "SELECT workflow_id, run_id, pipeline, shape, path, owner_xid FROM durapipe.waiting "
            "WHERE app = :app ORDER BY since"), {"app": app.dbos_name}).all()
    taken: list[str] = []
    registered_queues: set[str] = set()
    guarded = _claim_fits(engine, schema) if waiting else False
    for workflow_id, run_id, pipeline, shape, path, owner_xid in waiting:
        reg = app.pipelines.get(pipeline)
        if reg is None:
            continue
        with engine.begin() as con:
            verdict = judge(con, schema, app.dbos_name, reg, shape, workflow_id, path, run_id)
        if not verdict.compatible:
            continue
        queue = shape_queue(app.dbos_name, reg.version)
        if queue not in registered_queues:
            DBOS.register_queue(queue, polling_interval_sec=0.5, on_conflict="always_update")
            registered_queues.add(queue)
        if _claim(engine, schema, workflow_id, owner_xid, queue, guarded):
            taken.append(workflow_id)
            log.info("took over run %s (%s) of pipeline %r, recorded by shape %s", run_id,
                     workflow_id, pipeline, shape)
    return taken


# The columns of DBOS 3.4's workflow_status that a claim writes or checks.
_CLAIM_COLUMNS = {"workflow_uuid", "status", "owner_xid", "started_at_epoch_ms", "recovery_attempts",
                  "queue_name", "updated_at"}


def _claim_fits(engine: sa.Engine, schema: str) -> bool:
    """True when ``workflow_status`` has the columns :func:`_claim` writes (DBOS 3.4's)."""
    with engine.begin() as con:
        found = {r[0] for r in con.execute(sa.text(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = :schema "
            "AND table_name = 'workflow_status'"), {"schema": schema}).all()}
    if _CLAIM_COLUMNS <= found:
        return True
    log.warning("DBOS's workflow_status table lacks %s: waiting runs are handed over with "
                "DBOS.resume_workflow, unguarded by their owner", sorted(_CLAIM_COLUMNS - found))
    return False


def _claim(engine: sa.Engine, schema: str, workflow_id: str, owner_xid: str | None,
           queue: str, guarded: bool) -> bool:
    """Put a waiting workflow on ``queue`` while the execution that parked it still owns it.

    The same change as DBOS's recovery (``reenqueue_for_recovery``: PENDING -> ENQUEUED, no
    owner), guarded by the parked owner's token instead of its executor id, so a workflow
    another execution took meanwhile is never run twice. A row whose owner changed is
    stale (that execution continued it, or parks it again under its own token). On a DBOS
    whose table differs, ``DBOS.resume_workflow`` moves it instead.
    """
    if not guarded:
        with engine.begin() as con:
            con.execute(sa.text("DELETE FROM durapipe.waiting WHERE workflow_id = :id"),
                        {"id": workflow_id})
        DBOS.resume_workflow(workflow_id, queue_name=queue)
        return True
    with engine.begin() as con:
        res = con.execute(sa.text(
            f"UPDATE {_q(schema)}.workflow_status SET status = 'ENQUEUED', owner_xid = NULL, "
            "started_at_epoch_ms = NULL, recovery_attempts = 0, queue_name = :queue, "
            "updated_at = (EXTRACT(EPOCH FROM now()) * 1000)::bigint "
            "WHERE workflow_uuid = :id AND status = 'PENDING' "
            "AND owner_xid IS NOT DISTINCT FROM :owner"),
            {"id": workflow_id, "owner": owner_xid, "queue": queue})
        con.execute(sa.text("DELETE FROM durapipe.waiting WHERE workflow_id = :id "
                            "AND owner_xid IS NOT DISTINCT FROM :owner"),
                    {"id": workflow_id, "owner": owner_xid})
        return bool(res.rowcount)

