"""Where an App records, said out loud: the URL it resolves, the checks before launch, and
one-line errors instead of driver tracebacks.

- The URL: ``database_url=``, else ``DURAPIPE_DATABASE_URL``, else ``system_database_url``
  of a ``dbos-config.yaml`` in the working directory (what ``dbos start`` reads), else the
  embedded SQLite file. Only ``postgresql://`` (``postgres://``, ``postgresql+driver://``)
  and ``sqlite:///`` are accepted.
- At launch the App logs where it records (logger ``durapipe``), checks that Postgres
  answers (a :class:`~durapipe.errors.DatabaseError` with the redacted URL and the cause
  otherwise) and warns when DBOS is about to create the database, since a typo in its name
  would otherwise send the audit trail to a new, empty database.
- The embedded SQLite default needs SQLite 3.42 or newer on Python 3.12 and later (DBOS
  3.4 fails inside its first migration otherwise); an older one is refused with the fix.
- Driver errors DBOS raises during launch become one ``DatabaseError``; a failed run's
  traceback is logged by DBOS as one line, since the caller gets the error itself.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import sys
from collections.abc import Mapping
from typing import Any

from ..audit import first_line, redact
from ..errors import AppStateError, DatabaseError

log = logging.getLogger("durapipe")
CONFIG_FILE = "dbos-config.yaml"
SCHEMES = ("postgresql://", "postgres://", "sqlite:///")
SQLITE_NEEDED = (3, 42, 0)
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def normalize_url(url: str) -> str:
    # SQLAlchemy-style driver suffixes are accepted: DBOS wants the plain scheme.
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def check_url(url: Any, app: str, source: str) -> str:
    """``url`` normalized, or an AppStateError naming where it came from and the fix."""
    if not isinstance(url, str) or not normalize_url(url).startswith(SCHEMES):
        shown = redact(url) if isinstance(url, str) else repr(url)
        raise AppStateError(
            f"App({app!r}): database URL {shown!r} (from {source}) is neither "
            "postgresql://user@host/db nor sqlite:///path.sqlite", app=app, url=shown)
    return normalize_url(url)


def config_file_url(path: str = CONFIG_FILE, env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(url, as written)`` of ``system_database_url`` in a ``dbos-config.yaml``, with
    ``${VAR}`` filled from the environment as DBOS does (unset: empty); None without one."""
    if not os.path.isfile(path):
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise AppStateError(f"{path}: cannot be read: {first_line(exc)}") from None
    raw = data.get("system_database_url") if isinstance(data, dict) else None
    if not isinstance(raw, str) or not raw.strip():
        return None
    values = os.environ if env is None else env
    return _VAR_RE.sub(lambda m: values.get(m.group(1), ""), raw).strip(), raw


def resolve_url(explicit: str | None, app: str, sqlite_default: str) -> tuple[str, str | None]:
    """The database an App records to, and a warning to log at launch (or None)."""
    if explicit:
        return check_url(explicit, app, "database_url="), None
    env = os.environ.get("DURAPIPE_DATABASE_URL")
    if env:
        return check_url(env, app, "DURAPIPE_DATABASE_URL"), None
    found = config_file_url()
    if found is not None:
        url, raw = found
        if url:
            return check_url(url, app, CONFIG_FILE), None
        return sqlite_default, (
            f"{CONFIG_FILE} names system_database_url {raw}, which is empty here (is the "
            f"variable set?): app {app!r} records to the embedded SQLite file instead")
    return sqlite_default, None


def sqlite_problem(python: tuple[int, ...] | None = None, sqlite: tuple[int, ...] | None = None) -> str | None:
    """Why the embedded SQLite default cannot work on this Python (None when it can)."""
    python = tuple(sys.version_info[:2]) if python is None else python
    sqlite = sqlite3.sqlite_version_info if sqlite is None else sqlite
    if python >= (3, 12) and tuple(sqlite) < SQLITE_NEEDED:
        have = ".".join(map(str, sqlite))
        return (f"the embedded SQLite database needs SQLite 3.42 or newer on Python "
                f"{python[0]}.{python[1]}, and this Python links SQLite {have}: use Postgres "
                "(DURAPIPE_DATABASE_URL=postgresql://...), or a Python built with a newer "
                "SQLite (e.g. python.org or uv's builds), or Python 3.11")
    return None


def check_postgres(url: str) -> bool:
    """Raise DatabaseError unless the server answers as this role; True when the database
    exists, False when DBOS will create it (it connects to ``postgres`` for that too)."""
    import psycopg
    from sqlalchemy.engine import make_url

    try:
        psycopg.connect(url, connect_timeout=10).close()
        return True
    except psycopg.Error as exc:
        first = exc
    name = make_url(url).database
    try:
        maintenance = make_url(url).set(database="postgres").render_as_string(False)
        with psycopg.connect(maintenance, connect_timeout=10) as con:
            exists = con.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    except psycopg.Error:
        exists = (1,)  # the server or the role is the problem: report the first error
    if exists:
        raise DatabaseError(f"cannot reach database {redact(url)}: {first_line(first)}",
                            url=redact(url)) from None
    return False


def launch_error(exc: BaseException, url: str) -> DatabaseError | None:
    """A DatabaseError for a driver error DBOS raised while launching, else None."""
    import psycopg
    import sqlalchemy as sa

    if isinstance(exc, (sa.exc.SQLAlchemyError, psycopg.Error, sqlite3.Error)):
        text = first_line(getattr(exc, "orig", None) or exc)
        return DatabaseError(f"cannot use database {redact(url)}: {text}", url=redact(url))
    return None


_NAME_RE = re.compile(r"^[a-z0-9_-]{3,256}$")


def dbos_app_name(name: str) -> str:
    """The name DBOS records for App ``name``: lower case, other characters as '-'."""
    if not isinstance(name, str):
        raise AppStateError(f"App({name!r}): the app name must be a string, as App('blog')", app=repr(name))
    slug = re.sub(r"[^a-z0-9_-]", "-", name.lower())
    if not _NAME_RE.match(slug):
        raise AppStateError(
            f"App({name!r}): an app name needs 3 to 256 letters, digits, '-' or '_'", app=name
        )
    return slug


def sqlite_url(name: str) -> str:
    return f"sqlite:///{name.replace('-', '_')}.sqlite"


def prepare_sqlite(url: str) -> None:
    """Create the SQLite file in WAL mode so waiters are not stalled by journal locks."""
    path = url.split("sqlite:///", 1)[-1]
    if not path or path == ":memory:":
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()
