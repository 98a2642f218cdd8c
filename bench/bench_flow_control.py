"""Flow control benchmark: what a durable ``Retry`` costs when nothing fails, what
``errors="collect"`` costs on a map where nothing fails, and what ``best_of(3, ...)`` adds
over a plain map of the same three candidates, measured interleaved in one process on one
Postgres.

Run alone: ``python bench/bench_flow_control.py postgresql://... [ROUNDS]``.
"""

from __future__ import annotations

import sys
from typing import Any

from common import interleave, median, p95

from durapipe import App, Retry, best_of, fn, map_over

ROUNDS = 60


def work(state: dict[str, Any]) -> dict[str, Any]:
    return {"v": state.get("candidate", state.get("item", 0))}


def section(url: str, rounds: int = ROUNDS) -> str:
    app = App("bench-flow-control", url)
    policy = Retry(attempts=3, backoff=1.0)
    plain = app.pipeline("plain", fn(work, name="a") >> fn(work, name="b") >> fn(work, name="c"))
    retried = app.pipeline("retried", fn(work, name="a", retry=policy) >> fn(work, name="b", retry=policy)
                           >> fn(work, name="c", retry=policy))
    raise_map = app.pipeline("raise_map", map_over("xs", fn(work, writes=["v"]), "out"))
    collect_map = app.pipeline("collect_map", map_over("xs", fn(work, writes=["v"]), "out",
                                                       errors="collect"))
    three = app.pipeline("three", map_over("xs", fn(work, writes=["v"]) >> fn(work, name="w2"), "out"))
    best = app.pipeline("best", best_of(3, fn(work) >> fn(work, name="w2"), score=lambda s: s["v"]))
    xs = list(range(20))
    with app:
        times = interleave({
            "plain": lambda: plain.run({}),
            "retried": lambda: retried.run({}),
            "raise_map": lambda: raise_map.run({"xs": xs}),
            "collect_map": lambda: collect_map.run({"xs": xs}),
            "three": lambda: three.run({"xs": [0, 1, 2]}),
            "best": lambda: best.run({}),
        }, rounds, warmup=5)

    def row(label: str, name: str) -> str:
        return f"| {label} | {median(times[name]):.2f} | {p95(times[name]):.2f} |"

    def ratio(a: str, b: str) -> str:
        return f"{median(times[a]) / median(times[b]):.2f}x"

    return "\n".join([
        "## Flow control: Retry, collected failures, best_of",
        "",
        f"{rounds} interleaved rounds after 5 warm-up rounds; one run per case per round.",
        "",
        "| case | median ms | p95 ms |",
        "|---|---|---|",
        row("3 fn steps", "plain"),
        row("3 fn steps, each with `Retry(attempts=3)` (nothing fails)", "retried"),
        row("map of 20, `errors=\"raise\"`", "raise_map"),
        row("map of 20, `errors=\"collect\"` (nothing fails)", "collect_map"),
        row("map of 3 two-step candidates", "three"),
        row("`best_of(3, ...)` of the same candidates", "best"),
        "",
        f"Ratios of medians: Retry {ratio('retried', 'plain')} of plain steps (a step with a "
        "policy leaves the single-thread fast path for sync functions but writes nothing more "
        f"when it succeeds); collect {ratio('collect_map', 'raise_map')} of raise; best_of "
        f"{ratio('best', 'three')} of the map (one more step: the recorded choice).",
        "",
    ])


if __name__ == "__main__":
    print(section(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else ROUNDS))
