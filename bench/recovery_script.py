"""Helper of bench_field: a 10-step durapipe run; `crash` blocks at step 5, `recover` resumes.

Usage: recovery_script.py DATABASE_URL MARKER_DIR MODE  (prints IMPORT/LAUNCH seconds)
"""

from __future__ import annotations

import sys
import time

t0 = time.perf_counter()
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from durapipe import App, fn  # noqa: E402

t_import = time.perf_counter() - t0
url, markers, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


def make(i: int) -> Any:
    def step(state: dict[str, Any]) -> None:
        if i == 5:
            if mode == "crash":
                (markers / "blocked").write_text(str(time.time()))
                time.sleep(3600)
            (markers / "resumed").write_text(str(time.time()))

    step.__name__ = f"s{i}"
    return fn(step)


node = make(0)
for k in range(1, 10):
    node = node >> make(k)
app = App("bench-recovery", url)
pipeline = app.pipeline("ten", node)

if __name__ == "__main__":
    t1 = time.perf_counter()
    with app:
        print(f"IMPORT {t_import:.4f} LAUNCH {time.perf_counter() - t1:.4f}", flush=True)
        if mode == "crash":
            pipeline.start({}, run_id=f"rec-{markers.name}")
            time.sleep(3600)
        app.get_run(f"rec-{markers.name}").result(timeout=60)
