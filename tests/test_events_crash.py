"""SIGKILL a run mid-token-stream: a reader in another process that followed throughout
sees one consistent history, with the restart of the run and of the model call marked."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

from dbutil import lines, spawn, wait_for
from durapipe import Event, EventType
from durapipe.engine.eventread import EventReader

SCRIPT = Path(__file__).parent / "scripts" / "stream_crash.py"
TEXT = "one two three four five six seven eight"


@pytest.mark.slow
def test_kill_mid_token_stream_marks_the_restart(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "effects.log"
    seen: list[Event] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            with EventReader(database_url) as reader:
                seen.extend(reader.follow("stream-run", timeout=90))
        except BaseException as exc:
            errors.append(exc)

    first = spawn(SCRIPT, database_url, str(log), "crash")
    reader = threading.Thread(target=follow)
    reader.start()
    try:
        wait_for(lambda: "streaming" in lines(log), timeout=60, what="the model to stream")
        wait_for(lambda: sum(e.type is EventType.TOKEN for e in seen) >= 3, timeout=30,
                 what="the reader to see tokens")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    again = spawn(SCRIPT, database_url, str(log), "recover")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and f"RESULT {TEXT}" in out, out
    reader.join(timeout=60)
    assert not errors and not reader.is_alive(), errors

    effects = Counter(lines(log))
    assert effects["prepare"] == 1 and effects["publish"] == 1  # recorded: never again
    assert effects["model-call"] == 2                           # in flight: run again once
    assert [e.offset for e in seen] == list(range(len(seen)))
    types = [e.type for e in seen]
    assert types.count(EventType.RUN_STARTED) == 1 and types.count(EventType.RUN_RESUMED) == 1
    assert types.count(EventType.MODEL_STARTED) == 1 and types.count(EventType.MODEL_RESTARTED) == 1
    resumed, restarted = types.index(EventType.RUN_RESUMED), types.index(EventType.MODEL_RESTARTED)
    assert resumed < restarted
    before = "".join(e.data["text"] for e in seen[:resumed] if e.type is EventType.TOKEN)
    after = "".join(e.data["text"] for e in seen[restarted:] if e.type is EventType.TOKEN)
    assert TEXT.startswith(before) and before and after == TEXT
    # each node started once and ended once, across both processes
    keyed = Counter((e.type, e.path) for e in seen if e.type in (
        EventType.NODE_STARTED, EventType.NODE_FINISHED))
    assert set(keyed.values()) == {1} and len(keyed) == 2 * 4  # seq + three nodes
    assert seen[-1].type is EventType.RUN_FINISHED and seen[-1].data["status"] == "SUCCESS"
    # a reader that comes later reads the same history
    with EventReader(database_url) as later:
        assert list(later.follow("stream-run")) == seen
