"""Which executor ids a live process holds, so two processes never share one by accident.

DBOS 3.4 has no executor heartbeat: a process that launches recovers every PENDING run
recorded under its executor id, also the runs a live process with the same id is
executing. On Postgres each launched App holds a session advisory lock named by its app
and executor id for as long as it runs (on a connection of its own; the lock goes with
the process, also when it is killed). A second process launching with an id that is
held is warned; ``recover`` and ``resume`` refuse to take runs from a live executor.
SQLite apps are single-process and skip this.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from dbos import DBOS

from ..errors import AppStateError
from .scope import check_name

log = logging.getLogger("durapipe")

# First key of every durapipe executor lock ("dp" in ASCII), so other advisory locks of the
# database (DBOS's own, the user's) never meet these.
_NAMESPACE = 0x6470
_TRY = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
_HELD = """
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND classid = %s AND objid = hashtext(%s)::oid AND objsubid = 2)
"""


def _key(app: str, executor_id: str) -> str:
    return f"{app}/{executor_id}"


def _postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class ExecutorLock:
    """The lock a launched App holds on its (app, executor id)."""

    def __init__(self, url: str, app: str, executor_id: str) -> None:
        self.url, self.app, self.executor_id = url, app, executor_id
        self.conn: psycopg.Connection[Any] | None = None

    def acquire(self) -> bool:
        """Take the lock; False (and a warning) when another live process holds it."""
        if not _postgres(self.url):
            return True
        try:
            self.conn = psycopg.connect(self.url, autocommit=True,
                                        application_name="durapipe-executor")
            row = self.conn.execute(_TRY, (_NAMESPACE, _key(self.app, self.executor_id))).fetchone()
        except psycopg.Error as exc:
            log.debug("durapipe: executor lock not taken: %s", exc)
            self.release()
            return True
        if row and row[0]:
            return True
        self.release()
        log.warning(
            "durapipe: executor id %r of app %r is held by another live process; both will "
            "recover and execute the same runs. Give each process its own executor id "
            "(App(..., executor_id=...), `--executor-id`, or DBOS__VMID)",
            self.executor_id, self.app,
        )
        return False

    def release(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
            self.conn = None


def alive(url: str, app: str, executor_id: str) -> bool:
    """True when a live process of ``app`` holds ``executor_id`` (Postgres only)."""
    if not _postgres(url):
        return False
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(_HELD, (_NAMESPACE, _key(app, executor_id))).fetchone()
    return bool(row and row[0])


def recover(app_name: str, url: str, dbos_name: str, executor_ids: list[str],
            force: bool) -> list[str]:
    """``App.recover``: hand the PENDING runs of dead executors back to their queues;
    refuse (unless ``force``) an executor a live process holds."""
    for executor in executor_ids:
        check_name(executor, "executor id", f"app {app_name!r}.recover")
    live = [e for e in executor_ids if alive(url, dbos_name, e)]
    if live and not force:
        raise AppStateError(
            f"app {app_name!r}: executor {live[0]!r} is held by a live process that is "
            "executing its runs; recover only executors whose process is gone "
            "(force=True overrides)", app=app_name, executor_id=live[0],
        )
    handles = DBOS._recover_pending_workflows(list(executor_ids))
    return [h.workflow_id for h in handles]
