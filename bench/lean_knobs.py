"""DBOS settings measured one at a time: `python bench/lean_knobs.py DATABASE_URL [name ...]`.

DBOS is a process singleton, so each setting runs in its own subprocess; the settings are
interleaved round by round (A B C A B C ...) so that machine load hits them alike. Each
child runs 10 no-op fn nodes: 80 sequential runs (median wall and CPU) and 200 runs from
20 threads (pipelines/s and CPU per pipeline).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "DBOS defaults (pre-ping on)": {"db_engine_kwargs": {"pool_pre_ping": True}},
    "durapipe (pre-ping off)": {},
    "pool_size 5": {"sys_db_pool_size": 5},
    "notification_coalesce_sec 0.05": {"notification_coalesce_sec": 0.05},
    "psycopg prepare_threshold 0": {"db_engine_kwargs": {"pool_pre_ping": False, "connect_args": {
        "application_name": "dbos_transact", "prepare_threshold": 0}}},
}


def child(url: str, extra: dict[str, Any]) -> None:
    from durapipe import App, fn

    def noop(state: dict[str, Any]) -> None:
        return None

    app = App("knob", url, dbos_config=extra)
    p = app.pipeline("seq10", fn(noop) >> fn(noop) >> fn(noop) >> fn(noop) >> fn(noop)
                     >> fn(noop) >> fn(noop) >> fn(noop) >> fn(noop) >> fn(noop))
    with app:
        for _ in range(20):
            p.run({})
        walls, cpus = [], []
        for _ in range(80):
            c0, t0 = time.process_time(), time.perf_counter()
            p.run({})
            walls.append((time.perf_counter() - t0) * 1000)
            cpus.append((time.process_time() - c0) * 1000)
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(lambda _: p.run({}), range(20)))
            c0, t0 = time.process_time(), time.perf_counter()
            list(pool.map(lambda _: p.run({}), range(200)))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps([statistics.median(walls), statistics.median(cpus), 200 / wall, cpu * 1000 / 200]))


def main() -> None:
    url, only = sys.argv[1], sys.argv[2:]
    res: dict[str, list[list[float]]] = {k: [] for k in CONFIGS if not only or k in only}
    for _ in range(int(os.environ.get("ROUNDS", "3"))):
        for name in res:
            out = subprocess.run([sys.executable, __file__, "--child", url, json.dumps(CONFIGS[name])],
                                 capture_output=True, text=True, check=True)
            res[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| setting | 10 nodes median ms | CPU ms | pipelines/s at 20 | CPU ms / pipeline |")
    print("|---|---|---|---|---|")
    for name, rows in res.items():
        cols = [statistics.median(c) for c in zip(*rows, strict=True)]
        print(f"| {name} | {cols[0]:.2f} | {cols[1]:.2f} | {cols[2]:.1f} | {cols[3]:.2f} |")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
