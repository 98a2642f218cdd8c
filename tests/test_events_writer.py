"""The event writer on Postgres: keyed events once across batches and inside one batch,
restart markers, gapless offsets per run with several runs in one batch, and a batch
written without anyone waiting once the run goes quiet."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from dbutil import wait_for
from durapipe import EventType
from durapipe.engine.eventlog import EventLog, Pending
from durapipe.engine.eventread import EventReader


@pytest.fixture()
def writer(database_url: str) -> Iterator[EventLog]:
    log = EventLog(database_url)
    log.start()
    try:
        yield log
    finally:
        log.stop()


def ev(run: str, type: str, key: str | None = None, on_repeat: str | None = None,
       path: str | None = "0") -> Pending:
    return Pending(run, type, path, "p", "run", {"n": 1}, time.time(), key, on_repeat)


def test_keys_once_markers_and_offsets_across_and_inside_batches(
        writer: EventLog, database_url: str) -> None:
    for e in (ev("a", "run_started", "run", "run_resumed"), ev("b", "run_started", "run"),
              ev("a", "token"), ev("a", "node_started", "started:0.1", path="0.1"),
              # a replay inside the same batch: the marker, and the repeated node dropped
              ev("a", "run_started", "run", "run_resumed"),
              ev("a", "node_started", "started:0.1", path="0.1")):
        writer.emit(e)
    writer.wait_written()
    for e in (ev("a", "run_started", "run", "run_resumed"),  # a later process replays it
              ev("a", "node_started", "started:0.1", path="0.1"),
              ev("a", "node_finished", "ended:0.1", path="0.1"),
              ev("b", "run_finished", "run_end", "run_finished")):
        writer.emit(e)
    writer.wait_written()
    with EventReader(database_url) as reader:
        a, b = reader.read("a"), reader.read("b")
    assert [e.offset for e in a] == list(range(len(a)))
    assert [e.type for e in a] == [EventType.RUN_STARTED, EventType.TOKEN,
                                   EventType.NODE_STARTED, EventType.RUN_RESUMED,
                                   EventType.RUN_RESUMED, EventType.NODE_FINISHED]
    assert [(e.offset, e.type) for e in b] == [(0, EventType.RUN_STARTED),
                                               (1, EventType.RUN_FINISHED)]
    assert a[2].path == "0.1" and a[0].data == {"n": 1} and a[0].name == "p"


def test_a_batch_is_written_once_the_run_goes_quiet(writer: EventLog, database_url: str) -> None:
    writer.emit(ev("q", "run_started", "run"))
    writer.emit(ev("q", "node_finished", "ended:0.0", path="0.0"))
    with EventReader(database_url) as reader:  # nobody flushes: the writer's quiet rule
        wait_for(lambda: len(reader.read("q")) == 2, timeout=10, what="the quiet batch")
