"""Steps that log a side effect per run and can SIGKILL their own process at the N-th one."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from durapipe import fn


class KillingLog:
    """``step(label)`` appends ``<run>:<label>`` to ``log`` and kills the process right after
    the line that ``kill_at`` names: a number N is the N-th line, ``<run>:<label>`` that
    step's line, "0" never."""

    def __init__(self, log: Path, kill_at: str) -> None:
        self.log, self.kill_at = log, kill_at
        self.lock = threading.Lock()
        self.written = 0

    def write(self, line: str) -> None:
        """After 10 ms of work, append ``line``; SIGKILL the process if ``kill_at`` names it."""
        time.sleep(0.01)
        with self.lock:
            with self.log.open("a") as f:
                f.write(line + "\n")
            self.written += 1
            if self.kill_at in (line, str(self.written)):
                os.kill(os.getpid(), signal.SIGKILL)

    def step(self, label: str) -> Any:
        def body(state: dict[str, Any]) -> dict[str, Any]:
            self.write(f"{state['run']}:{label}")
            return {label: True}

        body.__name__ = label
        return fn(body)


def start_then_die_or_finish(pipeline: Any, runs: int, prefix: str, kill_at: str,
                             labels: list[str], inputs: dict[str, Any] | None = None) -> list[Any]:
    """The two lives of a kill script.

    With ``kill_at`` the runs ``<prefix>0..`` start and the process waits for a step to kill
    it. Without, it recovers: every run id the first process meant to start is started
    again (a recorded run returns its recovering self, one the kill prevented starts now),
    and each run must end with every label's step done. Returns the runs' results.
    """
    if kill_at != "0":
        for i in range(runs):
            pipeline.start({**(inputs or {}), "run": f"{prefix}{i}"}, run_id=f"{prefix}{i}")
        time.sleep(120)
        print("KILL POINT NEVER REACHED", flush=True)
        sys.exit(3)
    handles = [pipeline.start({**(inputs or {}), "run": f"{prefix}{i}"}, run_id=f"{prefix}{i}")
               for i in range(runs)]
    results = [handle.result(timeout=120) for handle in handles]
    for result in results:
        assert all(result.state[label] for label in labels), result.state
    return results
