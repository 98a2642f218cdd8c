"""A rejected gate is a decision: the run ends with GateRejected and DBOS's log says so in
one INFO line, not an ERROR with a traceback. Other failures keep an ERROR record, of one
line with the error's type and text."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dbutil import wait_for
from durapipe import App, GateRejected, NodeFailed, Pipeline, fn, gate


def publish(state: dict[str, Any]) -> dict[str, Any]:
    return {"published": True}


def broken(state: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("really broken")


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def dbos_log() -> Iterator[Keep]:
    keep = Keep()
    logger = logging.getLogger("dbos")
    logger.addHandler(keep)
    yield keep
    logger.removeHandler(keep)


def test_rejected_gate_is_one_info_line(make_app: Callable[..., App], dbos_log: Keep) -> None:
    app = make_app("gate-outcome")
    app.pipeline("review", gate("legal", "Ship?") >> fn(publish))
    app.pipeline("broken", fn(broken))
    with app:
        logging.getLogger("dbos").setLevel(logging.INFO)  # the level a service runs DBOS at
        handle = Pipeline(app, app.registered("review")).start({}, run_id="rej-1")
        wait_for(lambda: app.pending("rej-1"), what="the gate")
        app.reject("rej-1", "legal", by="alice", comment="not now")
        with pytest.raises(GateRejected):
            handle.result(timeout=30)
        failing = Pipeline(app, app.registered("broken")).start({}, run_id="bad-1")
        with pytest.raises(NodeFailed):
            failing.result(timeout=30)
        wait_for(lambda: any("really broken" in r.getMessage() for r in dbos_log.records),
                 what="DBOS's error record of the failing run")
    assert not any(r.exc_info for r in dbos_log.records)  # no traceback: one line each
    lines = [r.getMessage() for r in dbos_log.records if r.levelno == logging.INFO]
    assert any(m.startswith("run ended as decided: GateRejected: gate") and "alice" in m for m in lines), lines
    errors = [r.getMessage() for r in dbos_log.records if r.levelno >= logging.WARNING]
    assert not any("GateRejected" in m for m in errors), errors
    assert [m for m in errors if "Exception encountered" in m] == [
        m for m in errors if "Exception encountered" in m and "NodeFailed" in m and "really broken" in m
    ] != []
