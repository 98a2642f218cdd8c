"""The Postgres side of :mod:`.slots`: tables, the slot transaction, leases and wake-ups.

Tables (schema ``durapipe``, created at launch):

- ``limits`` (app, key): the declared bound ``concurrency``, ``adaptive``, the limit in
  force ``current`` (fractional while it grows; its whole part counts) and when it was last
  lowered;
- ``limit_slots`` (app, holder): one row per slot taken, with the run's workflow id, the
  process that holds it and its lease; released as done (a replay needs no slot) or deleted;
- ``limit_changes``: every change of a whole limit, with why;
- view ``limit_status``: per key, bound, limit and slots in use.

Only DBOS's public table ``workflow_status`` is read (a slot of a finished run is free);
the connections are this module's own, not DBOS's pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import psycopg
import sqlalchemy as sa

from ..errors import error_text
from . import slots
from .slots import Limiter, Slot, Spec, snap

log = logging.getLogger("durapipe")

_FINISHED = "('SUCCESS', 'ERROR', 'CANCELLED', 'MAX_RECOVERY_ATTEMPTS_EXCEEDED')"


def _schema_sql(system: str) -> str:
    return f"""
CREATE SCHEMA IF NOT EXISTS durapipe;
CREATE TABLE IF NOT EXISTS durapipe.limits (
  app text NOT NULL, key text NOT NULL, concurrency integer NOT NULL,
  adaptive boolean NOT NULL, current double precision NOT NULL, decreased_at timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (app, key));
CREATE TABLE IF NOT EXISTS durapipe.limit_slots (
  app text NOT NULL, key text NOT NULL, holder text NOT NULL, workflow_id text NOT NULL,
  process text NOT NULL, acquired_at timestamptz NOT NULL DEFAULT now(),
  lease_until timestamptz NOT NULL, released_at timestamptz, PRIMARY KEY (app, holder));
CREATE INDEX IF NOT EXISTS limit_slots_held ON durapipe.limit_slots (app, key)
  WHERE released_at IS NULL;
CREATE TABLE IF NOT EXISTS durapipe.limit_changes (
  id bigserial PRIMARY KEY, app text NOT NULL, key text NOT NULL,
  at timestamptz NOT NULL DEFAULT now(), old_limit integer NOT NULL,
  new_limit integer NOT NULL, reason text NOT NULL, holder text);
CREATE OR REPLACE VIEW durapipe.limit_status AS
SELECT l.app, l.key, l.concurrency, l.adaptive,
       GREATEST(1, floor(l.current))::integer AS current_limit,
       (SELECT count(*) FROM durapipe.limit_slots s
         WHERE s.app = l.app AND s.key = l.key AND s.released_at IS NULL
           AND s.lease_until > now() AND NOT EXISTS (
             SELECT 1 FROM {system}.workflow_status w
             WHERE w.workflow_uuid = s.workflow_id AND w.status IN {_FINISHED})) AS in_use,
       (SELECT count(*) FROM durapipe.limit_changes c
         WHERE c.app = l.app AND c.key = l.key) AS changes,
       l.decreased_at AS last_decrease, l.updated_at
FROM durapipe.limits l;
"""


_DECLARE = sa.text("""
INSERT INTO durapipe.limits (app, key, concurrency, adaptive, current)
VALUES (:app, :key, :n, :adaptive, :n)
ON CONFLICT (app, key) DO UPDATE SET concurrency = excluded.concurrency,
  adaptive = excluded.adaptive,
  current = CASE WHEN excluded.adaptive THEN LEAST(durapipe.limits.current, excluded.concurrency)
                 ELSE excluded.concurrency END,
  updated_at = now()
""")
_LOCK = sa.text("SELECT GREATEST(1, floor(current))::integer FROM durapipe.limits "
                "WHERE app = :app AND key = :key FOR UPDATE")


def _take_sql(system: str) -> sa.TextClause:
    # Runs after _LOCK in the same transaction: its snapshot sees every slot committed by
    # an earlier holder of the key's lock, so two processes never both see a free slot.
    return sa.text(f"""
WITH mine AS (
  SELECT released_at, lease_until > now() AS alive FROM durapipe.limit_slots
  WHERE app = :app AND holder = :holder
), used AS (
  SELECT count(*) AS c FROM durapipe.limit_slots s
  WHERE s.app = :app AND s.key = :key AND s.released_at IS NULL AND s.holder <> :holder
    AND s.lease_until > now() AND NOT EXISTS (
      SELECT 1 FROM {system}.workflow_status w
      WHERE w.workflow_uuid = s.workflow_id AND w.status IN {_FINISHED})
), ins AS (
  INSERT INTO durapipe.limit_slots (app, key, holder, workflow_id, process, acquired_at, lease_until)
  SELECT :app, :key, :holder, :wf, :process, now(), now() + make_interval(secs => :lease)
  WHERE NOT EXISTS (SELECT 1 FROM mine WHERE released_at IS NOT NULL)
    AND (EXISTS (SELECT 1 FROM mine WHERE alive) OR (SELECT c FROM used) < :n)
  ON CONFLICT (app, holder) DO UPDATE SET process = excluded.process,
    acquired_at = now(), lease_until = excluded.lease_until, released_at = NULL
  RETURNING extract(epoch FROM acquired_at)::float8 AS at
)
SELECT EXISTS (SELECT 1 FROM mine WHERE released_at IS NOT NULL), (SELECT at FROM ins)
""")


_RELEASE_DONE = sa.text("""
WITH r AS (UPDATE durapipe.limit_slots SET released_at = now()
           WHERE app = :app AND holder = :holder AND released_at IS NULL RETURNING key)
SELECT pg_notify(:channel, :app || chr(10) || key) FROM r
""")
_RELEASE_AGAIN = sa.text("""
WITH r AS (DELETE FROM durapipe.limit_slots WHERE app = :app AND holder = :holder RETURNING key)
SELECT pg_notify(:channel, :app || chr(10) || key) FROM r
""")
_RENEW = sa.text("""
UPDATE durapipe.limit_slots SET lease_until = now() + make_interval(secs => :lease)
WHERE app = :app AND holder = ANY(:held) AND released_at IS NULL
""")


class PgLimiter(Limiter):
    """Slots shared by every process of the app through Postgres."""

    def __init__(self, app_name: str, specs: dict[str, Spec], database_url: str,
                 system_schema: str, process: str) -> None:
        super().__init__(app_name, specs)
        self.url = database_url
        self.system = '"' + system_schema.replace('"', '""') + '"'
        self.process = process
        self.engine = _engine_for(database_url)
        self._take = _take_sql(self.system)
        self._stop = threading.Event()
        self._mine: set[str] = set()  # holders of the slots this process holds
        with self.engine.begin() as con:
            con.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('durapipe.limits'))"))
            con.exec_driver_sql(_schema_sql(self.system))
            for spec in specs.values():
                con.execute(_DECLARE, {"app": app_name, "key": spec.key, "n": spec.n,
                                       "adaptive": spec.adaptive})
        self._threads = [threading.Thread(target=self._listen, name="durapipe-limits-listen",
                                          daemon=True),
                         threading.Thread(target=self._renew, name="durapipe-limits-lease",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    # -- slots ---------------------------------------------------------------------------
    async def _try(self, key: str, holder: str, workflow_id: str) -> Slot | None | bool:
        return await asyncio.to_thread(self._try_sync, key, holder, workflow_id)

    def _try_sync(self, key: str, holder: str, workflow_id: str) -> Slot | None | bool:
        with self.engine.begin() as con:
            n = con.execute(_LOCK, {"app": self.app, "key": key}).scalar_one()
            done, at = con.execute(self._take, {
                "app": self.app, "key": key, "holder": holder, "wf": workflow_id,
                "process": self.process, "lease": slots.LEASE_SECONDS, "n": n}).one()
        if done:
            return None
        if at is None:
            return False
        with self._lock:
            self._mine.add(holder)
        return Slot(key, holder, float(at))

    async def release(self, slot: Slot, done: bool) -> None:
        await asyncio.to_thread(self._release_sync, slot, done)

    def _release_sync(self, slot: Slot, done: bool) -> None:
        with self._lock:
            self._mine.discard(slot.holder)
        with self.engine.begin() as con:
            con.execute(_RELEASE_DONE if done else _RELEASE_AGAIN,
                        {"app": self.app, "holder": slot.holder, "channel": slots.CHANNEL})

    # -- adaptive ------------------------------------------------------------------------
    async def observe(self, spec: Spec, slot: Slot, overloaded: bool, why: str) -> None:
        await asyncio.to_thread(self._observe_sync, spec, slot, overloaded, why)

    def _observe_sync(self, spec: Spec, slot: Slot, overloaded: bool, why: str) -> None:
        params = {"app": self.app, "key": spec.key}
        with self.engine.begin() as con:
            row = con.execute(sa.text(
                "SELECT current, concurrency, extract(epoch FROM decreased_at)::float8 "
                "FROM durapipe.limits WHERE app = :app AND key = :key FOR UPDATE"), params).one()
            was, bound, decreased = float(row[0]), int(row[1]), row[2]
            if overloaded:
                if decreased is not None and slot.acquired < decreased:
                    return  # this slot was taken under the limit already lowered
                now = max(1.0, float(int(was) // 2))
            else:
                now = min(float(bound), snap(was + 1.0 / max(1, int(was))))
                if now == was:
                    return
            con.execute(sa.text(
                "UPDATE durapipe.limits SET current = :now, updated_at = now(), decreased_at = "
                "CASE WHEN :over THEN now() ELSE decreased_at END WHERE app = :app AND key = :key"),
                {**params, "now": now, "over": overloaded})
            if int(now) != int(was):
                con.execute(sa.text(
                    "INSERT INTO durapipe.limit_changes (app, key, old_limit, new_limit, reason, "
                    "holder) VALUES (:app, :key, :was, :now, :why, :holder)"),
                    {**params, "was": int(was), "now": int(now), "holder": slot.holder,
                     "why": (why or "success")[:500]})
                if now > was:
                    con.execute(sa.text("SELECT pg_notify(:channel, :app || chr(10) || :key || chr(10))"),
                                {**params, "channel": slots.CHANNEL})
                log.info("durapipe: limit %r %d -> %d (%s)", spec.key, int(was), int(now),
                         why or "success")

    def status(self) -> list[dict[str, Any]]:
        with self.engine.begin() as con:
            rows = con.execute(sa.text(
                "SELECT key, concurrency, adaptive, current_limit, in_use FROM "
                "durapipe.limit_status WHERE app = :app ORDER BY key"), {"app": self.app}).all()
        return [{"key": r[0], "concurrency": r[1], "adaptive": r[2], "limit": r[3],
                 "in_use": int(r[4])} for r in rows]

    def changes_of(self, key: str) -> list[dict[str, Any]]:
        with self.engine.begin() as con:
            rows = con.execute(sa.text(
                "SELECT at, old_limit, new_limit, reason, holder FROM durapipe.limit_changes "
                "WHERE app = :app AND key = :key ORDER BY id"), {"app": self.app, "key": key}).all()
        return [{"key": key, "at": r[0].timestamp(), "old_limit": r[1], "new_limit": r[2],
                 "reason": r[3], "holder": r[4]} for r in rows]

    # -- background threads ----------------------------------------------------------------
    def _listen(self) -> None:
        prefix = self.app + "\n"
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as con:
                    con.execute(f"LISTEN {slots.CHANNEL}")
                    while not self._stop.is_set():
                        for note in con.notifies(timeout=0.5):
                            if note.payload.startswith(prefix):
                                key = note.payload[len(prefix):]
                                grown = key.endswith("\n")  # the limit grew: wake them all
                                self.wake(key.rstrip("\n"), every=grown)
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    log.warning("durapipe: limit wake-ups lost their connection (%s); waiters "
                                "look every %.0f s until it is back", error_text(exc),
                                slots.POLL_SECONDS)
                    self._stop.wait(1.0)

    def _renew(self) -> None:
        last_sweep = 0.0
        while not self._stop.wait(slots.LEASE_SECONDS / 3):
            try:
                with self._lock:
                    held = sorted(self._mine)
                with self.engine.begin() as con:
                    if held:
                        con.execute(_RENEW, {"app": self.app, "held": held,
                                             "lease": slots.LEASE_SECONDS})
                    if time.monotonic() - last_sweep > 60:
                        last_sweep = time.monotonic()
                        # Released slots of finished runs are never replayed: drop them.
                        con.execute(sa.text(
                            f"DELETE FROM durapipe.limit_slots s WHERE s.app = :app AND "
                            f"s.released_at IS NOT NULL AND EXISTS (SELECT 1 FROM "
                            f"{self.system}.workflow_status w WHERE w.workflow_uuid = "
                            f"s.workflow_id AND w.status IN {_FINISHED})"), {"app": self.app})
            except sa.exc.SQLAlchemyError as exc:
                log.warning("durapipe: could not renew limit leases: %s", error_text(exc))

    def close(self) -> None:
        self._stop.set()
        super().close()
        for t in self._threads:
            t.join(timeout=2.0)
        self.engine.dispose()


def new_limiter(app_name: str, specs: dict[str, Spec], database_url: str,
                system_schema: str) -> Limiter:
    """The limiter for a launched app: in-process on SQLite (or with no limit declared,
    so an app without limits opens no connection for them), in Postgres otherwise."""
    if database_url.startswith("sqlite") or not specs:
        return Limiter(app_name, specs)
    return PgLimiter(app_name, specs, database_url, system_schema, uuid.uuid4().hex)


def _engine_for(database_url: str) -> sa.Engine:
    url = database_url.replace("postgresql://", "postgresql+psycopg://", 1).replace(
        "postgres://", "postgresql+psycopg://", 1)
    return sa.create_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=True)
