"""Lean durable nodes (issue 9): durapipe against hand-written DBOS and LangGraph.

Interleaved in one process on one Postgres: (a) 10 sequential no-op fn nodes; (d) 5 I/O
nodes + 5 pure nodes against a DBOS workflow that checkpoints all ten; (b) 3 branches of
3 nodes then a join, where durapipe runs the branches as steps of the parent workflow at
step numbers reserved in branch order; and throughput of (a) at 20 in flight.
"""

from __future__ import annotations

from typing import Any

from bench_field import (
    CONCURRENCY,
    THROUGHPUT_N,
    WARMUP,
    field_pipelines,
    langgraph,
    lg,
    measure,
    noop,
    raw,
    raw_noop,
    raw_par,
    raw_seq,
    throughput,
)
from common import median, p95, table
from dbos import DBOS

from durapipe import App, fn, transform
from durapipe.engine.scope import is_run_workflow

ROUNDS = 40
PAR_ROUNDS = 10


@DBOS.workflow(name="bench.lean.par_reserved")
async def raw_par_reserved() -> int:
    """The floor for (b) in DBOS: three branches inline, step numbers reserved up front."""
    import asyncio

    async def branch(b: int, slots: list[Any]) -> None:
        for i, slot in enumerate(slots):
            await slot.run_async({"name": f"b{b}.{i}"}, raw_noop)

    slots = [[DBOS.reserve_step() for _ in range(3)] for _ in range(3)]
    await asyncio.gather(*(branch(b, s) for b, s in enumerate(slots)))
    await DBOS.run_step_async({"name": "join"}, raw_noop)
    return 3


def section(database_url: str) -> str:
    app = App("bench-lean", database_url)
    seq10, par = field_pipelines(app)
    pure = transform(lambda s: {"k": s.get("k", 0) + 1}, name="pure")
    mixed = app.pipeline("mixed", fn(noop) >> pure >> fn(noop) >> pure >> fn(noop) >> pure
                         >> fn(noop) >> pure >> fn(noop) >> pure)
    with langgraph(database_url) as (lg_seq, lg_par):
        with app:
            a = measure({"durapipe": lambda: seq10.run({}), "raw DBOS": raw(raw_seq, 10),
                         "LangGraph": lg(lg_seq)}, ROUNDS)
            d = measure({"durapipe 5 fn + 5 transforms": lambda: mixed.run({}),
                         "raw DBOS 10 steps": raw(raw_seq, 10),
                         "LangGraph 10 nodes": lg(lg_seq)}, ROUNDS)
            b = measure({"durapipe": lambda: par.run({}),
                         "raw DBOS, child workflows": raw(raw_par),
                         "raw DBOS, reserved steps": raw(raw_par_reserved),
                         "LangGraph": lg(lg_par)}, PAR_ROUNDS)
            thr = {"durapipe": throughput(lambda: seq10.run({})),
                   "raw DBOS": throughput(raw(raw_seq, 10)),
                   "LangGraph": throughput(lg(lg_seq))}
            recorded = sum(is_run_workflow(w.name) for w in DBOS.list_workflows(
                limit=100000, load_input=False, load_output=False))
    runs = 2 * (WARMUP + ROUNDS) + WARMUP + PAR_ROUNDS + CONCURRENCY + THROUGHPUT_N

    def rows(label: str, res: dict[str, tuple[list[float], list[float]]], base: str,
             nodes: int) -> list[list[str]]:
        out = []
        for name, (wall, cpu) in res.items():
            out.append([label, name, f"{median(wall):.2f}", f"{p95(wall):.2f}",
                        f"{median(wall) / nodes:.2f}", f"{median(wall) / median(res[base][0]):.2f}x",
                        f"{median(cpu):.2f}"])
        return out

    lat = (rows("(a) 10 sequential nodes", a, "raw DBOS", 10)
           + rows("(d) 5 I/O + 5 pure nodes", d, "raw DBOS 10 steps", 10)
           + rows("(b) 3 branches x 3 + join", b, "raw DBOS, child workflows", 10))
    trows = [[name, f"{pps:.0f}", f"{pps / thr['LangGraph'][0]:.2f}x", f"{cpu:.2f}",
              f"{cpu / thr['LangGraph'][1]:.2f}x"] for name, (pps, cpu) in thr.items()]

    def r(res: dict[str, tuple[list[float], list[float]]], x: str, y: str) -> str:
        return f"{median(res[x][0]) / median(res[y][0]):.2f}x"

    return "\n".join([
        "## Lean durable nodes: durapipe, hand-written DBOS, LangGraph",
        "",
        f"{ROUNDS} interleaved rounds for (a) and (d), {PAR_ROUNDS} for (b), one process, one "
        "Postgres. All DBOS cases share durapipe's DBOS configuration (no pool pre-ping). "
        "LangGraph: `PostgresSaver`, `durability=\"sync\"`. Per node = median / 10. CPU is "
        "`time.process_time` of the whole process per pipeline.",
        "",
        table(lat, ["case", "system", "median ms", "p95 ms", "ms / node", "vs DBOS baseline",
                    "CPU ms / pipeline"]),
        "",
        f"- (a) durapipe / raw DBOS {r(a, 'durapipe', 'raw DBOS')}, / LangGraph "
        f"{r(a, 'durapipe', 'LangGraph')}",
        f"- (d) durapipe / DBOS checkpointing all ten "
        f"{r(d, 'durapipe 5 fn + 5 transforms', 'raw DBOS 10 steps')}, / LangGraph "
        f"{r(d, 'durapipe 5 fn + 5 transforms', 'LangGraph 10 nodes')}",
        f"- (b) durapipe / raw DBOS with child workflows "
        f"{r(b, 'durapipe', 'raw DBOS, child workflows')}, / raw DBOS with reserved steps "
        f"{r(b, 'durapipe', 'raw DBOS, reserved steps')}, / LangGraph {r(b, 'durapipe', 'LangGraph')}; "
        f"durapipe workflows recorded: {recorded} for {runs} runs (no child workflows)",
        "",
        f"(c) Throughput: {THROUGHPUT_N} runs of (a) from {CONCURRENCY} threads.",
        "",
        table(trows, ["system", "pipelines / s", "vs LangGraph", "CPU ms / pipeline",
                      "CPU vs LangGraph"]),
        "",
    ])
