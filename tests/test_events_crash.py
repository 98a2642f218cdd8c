"""SIGKILL a run mid-token-stream: readers in another process that followed throughout
(``EventReader``, and ``handle.stream()`` / ``stream_async()`` of an App of their own) see
one consistent history, with the restart of the run and of the model call marked."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

from dbutil import lines, spawn, wait_for
from durapipe import Event, EventType, UnknownRun
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

    # A peer process of the app (same pipelines, an executor id of its own) reads through
    # run handles; the recovered run may land on it or on the restarted process.
    spec = importlib.util.spec_from_file_location("stream_crash_peer", SCRIPT)
    assert spec and spec.loader
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    peer.CONFIG["log"] = log
    watcher = peer.app
    watcher.database_url, watcher.executor_id = database_url, "watcher"
    by_handle: list[Event] = []
    by_async: list[Event] = []

    def handle_of() -> bool:
        try:
            watcher.get_run("stream-run")
            return True
        except UnknownRun:
            return False

    def follow_handle() -> None:
        try:
            by_handle.extend(watcher.get_run("stream-run").stream(timeout=90))
        except BaseException as exc:
            errors.append(exc)

    async def follow_async() -> None:
        handle = await watcher.get_run_async("stream-run")
        async for event in handle.stream_async(timeout=90):
            by_async.append(event)

    def follow_async_thread() -> None:
        try:
            asyncio.run(follow_async())
        except BaseException as exc:
            errors.append(exc)

    watcher.launch()
    first = spawn(SCRIPT, database_url, str(log), "crash")
    wait_for(handle_of, timeout=60, what="the run to be started by the other process")
    readers = [threading.Thread(target=f) for f in (follow, follow_handle, follow_async_thread)]
    for reader in readers:
        reader.start()
    try:
        wait_for(lambda: "streaming" in lines(log), timeout=60, what="the model to stream")
        wait_for(lambda: sum(e.type is EventType.TOKEN for e in seen) >= 3, timeout=30,
                 what="the reader to see tokens")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    try:
        again = spawn(SCRIPT, database_url, str(log), "recover")
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 0 and f"RESULT {TEXT}" in out, out
        for reader in readers:
            reader.join(timeout=60)
        assert not errors and not any(r.is_alive() for r in readers), errors
        assert watcher.get_run("stream-run").result(timeout=10).state["text"] == TEXT
    finally:
        watcher.shutdown()
    assert by_handle == seen and by_async == seen  # every reader: one and the same history

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
