"""Steps that log a side effect per run and can SIGKILL their own process at the N-th one."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from durapipe import fn


class KillingLog:
    """``step(label)`` appends ``<run>:<label>`` to ``log``; the ``kill_at``-th line kills."""

    def __init__(self, log: Path, kill_at: int) -> None:
        self.log, self.kill_at = log, kill_at
        self.lock = threading.Lock()
        self.written = 0

    def step(self, label: str) -> Any:
        def body(state: dict[str, Any]) -> dict[str, Any]:
            time.sleep(0.01)
            with self.lock:
                with self.log.open("a") as f:
                    f.write(f"{state['run']}:{label}\n")
                self.written += 1
                if self.kill_at and self.written == self.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return {label: True}

        body.__name__ = label
        return fn(body)
