"""Small helpers for tests that read the database or run a script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg


def sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one query against a test database and return its rows."""
    with psycopg.connect(url, autocommit=True) as con:
        cur = con.execute(query, params or None)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def spawn(script: Path, *args: str) -> subprocess.Popen[str]:
    """Start a Python script in its own process (so it can be SIGKILLed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(script), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(pred: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
