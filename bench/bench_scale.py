"""Scale curves: durapipe, hand-written DBOS and LangGraph (Postgres checkpointer), side by side.

One process, one Postgres, each size run by every system in turn (interleaved rounds):

1. pipeline length 1 .. 1,000 sequential no-op nodes: ms per node;
2. ``map_over`` of 10 .. 10,000 items with a 1-step and a 3-step body: ms per item, and
   the peak of the process's threads and of the database's connections during the map;
3. fan-out width 2 .. 64 one-step branches and a join: ms per run;
4. state 1 KB .. 10 MB carried through 3 nodes, and through a map of 10 items with a
   2-step body: bytes written per run (inputs, outputs and step rows; LangGraph's
   checkpoint tables).

Hand-written DBOS is the fastest idiomatic form: async steps, ``asyncio.gather`` of async
steps for a 1-step map and a fan-out, child workflows joined with ``handle.get_result()``
for a 3-step map body and as the other form of a fan-out (steps of one item stay in
order: DBOS numbers a workflow's steps as they start). ``--quick`` (or ``DURAPIPE_BENCH_QUICK=1``) runs reduced sizes.

Maps of 1,000 items and more are timed in 1 round after the warm-up (rounds column); a map
case that runs past MAP_TIMEOUT is reported as unfinished. The numbers go to
``bench/scale.json`` as they are measured; the tables and ``bench/scale.svg`` are drawn from
it (``python bench/scale_report.py`` draws them again); ``--only=length,map`` measures some
curves again and keeps the others. ``--quick`` writes ``scale-quick.json`` /
``scale-quick.svg`` instead (not committed). The full sizes take about an hour here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import operator
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, TypedDict

import psycopg
from common import median
from dbos import DBOS, SetWorkflowID

from durapipe import App, fn, map_over

QUICK = "--quick" in sys.argv or bool(os.environ.get("DURAPIPE_BENCH_QUICK"))
LENGTHS = [1, 10, 100] if QUICK else [1, 10, 100, 1000]
ITEMS = [10, 100, 1000] if QUICK else [10, 100, 1000, 10000]
WIDTHS = [2, 8, 32] if QUICK else [2, 8, 32, 64]
STATES = [1_000, 100_000, 1_000_000] if QUICK else [1_000, 100_000, 1_000_000, 10_000_000]
ROUNDS = 3
LARGE = 1000  # sizes from here on are timed in 1 round
MAP_TIMEOUT = 1800  # seconds for one map case (a system that takes longer is reported so)
HERE = Path(__file__).resolve().parent
JSON_PATH = HERE / ("scale-quick.json" if QUICK else "scale.json")
DATA: dict[str, Any] = {}


def rounds_for(n: int) -> int:
    return 1 if n >= LARGE else ROUNDS


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def _now() -> str:
    return f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


def record(curve: str, **fields: Any) -> None:
    """Keep one curve's numbers in DATA and write the JSON file (after every size, so a
    run that stops half-way keeps what it measured)."""
    old = DATA.setdefault("curves", {}).get(curve, {})
    DATA["curves"][curve] = {**fields, "at": old.get("at", _now()),
                             "load_before": old.get("load_before", STARTED_LOAD[0]),
                             "load_after": _load()}
    JSON_PATH.write_text(json.dumps(DATA, indent=1) + "\n")


STARTED_LOAD = [0.0]


def starting(curve: str) -> None:
    """Forget a curve's earlier numbers (a new measurement of it starts now)."""
    DATA.setdefault("curves", {}).pop(curve, None)
    STARTED_LOAD[0] = _load()


# -- the three systems' workloads ---------------------------------------------------------

def noop(state: dict[str, Any]) -> None:
    return None


def touch(state: dict[str, Any]) -> dict[str, Any]:
    return {"n": len(state.get("doc", ""))}


async def raw_noop() -> None:
    return None


@DBOS.workflow(name="bench.scale.seq")
async def raw_seq(n: int) -> int:
    for i in range(n):
        await DBOS.run_step_async({"name": f"s{i}"}, raw_noop)
    return n


@DBOS.workflow(name="bench.scale.gather")
async def raw_gather(n: int) -> int:
    # Steps numbered as they are called, in order: a deterministic fan-out.
    await asyncio.gather(*(DBOS.run_step_async({"name": f"i{i}"}, raw_noop) for i in range(n)))
    return n


@DBOS.workflow(name="bench.scale.item")
async def raw_item(i: int, steps: int) -> int:
    for j in range(steps):
        await DBOS.run_step_async({"name": f"s{j}"}, raw_noop)
    return i


@DBOS.workflow(name="bench.scale.children")
async def raw_children(n: int, steps: int) -> int:
    handles = []
    for i in range(n):  # children started in a fixed order
        with SetWorkflowID(f"{DBOS.workflow_id}/{i}"):
            handles.append(await DBOS.start_workflow_async(raw_item, i, steps))
    results = await asyncio.gather(*(h.get_result() for h in handles))
    return len(results)


@DBOS.workflow(name="bench.scale.par3x3")
async def raw_par3x3(children: bool) -> int:
    """3 branches x 3 steps, then a join step: child workflows joined with
    ``handle.get_result()``, or ``asyncio.gather`` of one coroutine per branch."""
    if children:
        handles = []
        for b in range(3):
            with SetWorkflowID(f"{DBOS.workflow_id}/{b}"):
                handles.append(await DBOS.start_workflow_async(raw_item, b, 3))
        await asyncio.gather(*(h.get_result() for h in handles))
    else:
        async def branch(b: int) -> None:
            for j in range(3):
                await DBOS.run_step_async({"name": f"b{b}.{j}"}, raw_noop)
        await asyncio.gather(*(branch(b) for b in range(3)))
    await DBOS.run_step_async({"name": "join"}, raw_noop)
    return 3


@DBOS.workflow(name="bench.scale.doc")
async def raw_doc(doc: str) -> int:
    async def size() -> int:
        return len(doc)
    for i in range(3):
        await DBOS.run_step_async({"name": f"s{i}"}, size)
    return len(doc)


class LGState(TypedDict, total=False):
    trail: Annotated[list[int], operator.add]
    items: list[int]
    item: int
    doc: str
    n: int


class LGTrail(TypedDict, total=False):
    trail: Annotated[list[int], operator.add]


class LGItem(LGTrail, total=False):
    i: int


def _lg_node(name: str) -> Callable[[LGState], dict[str, Any]]:
    def node(state: LGState) -> dict[str, Any]:
        return {"trail": [1]}
    node.__name__ = name
    return node


def lg_chain(n: int, checkpointer: Any) -> Any:
    from langgraph.graph import END, START, StateGraph

    g = StateGraph(LGState)
    for i in range(n):
        g.add_node(f"n{i}", _lg_node(f"n{i}"))
        g.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
    g.add_edge(f"n{n - 1}", END)
    return g.compile(checkpointer=checkpointer)


def lg_fanout(width: int, checkpointer: Any) -> Any:
    from langgraph.graph import END, START, StateGraph

    g = StateGraph(LGState)
    g.add_node("join", _lg_node("join"))
    for i in range(width):
        g.add_node(f"b{i}", _lg_node(f"b{i}"))
        g.add_edge(START, f"b{i}")
    g.add_edge([f"b{i}" for i in range(width)], "join")
    g.add_edge("join", END)
    return g.compile(checkpointer=checkpointer)


def lg_map(steps: int, checkpointer: Any) -> Any:
    """A map as LangGraph writes one: a Send per item to a node (a 3-step subgraph)."""
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Send

    g = StateGraph(LGState)
    if steps == 1:
        g.add_node("item", _lg_node("item"))
    else:
        sub = StateGraph(LGItem, output_schema=LGTrail)
        for j in range(steps):
            sub.add_node(f"s{j}", _lg_node(f"s{j}"))
            sub.add_edge(START if j == 0 else f"s{j - 1}", f"s{j}")
        sub.add_edge(f"s{steps - 1}", END)
        g.add_node("item", sub.compile())
    g.add_conditional_edges(START, lambda s: [Send("item", {"i": i}) for i in s["items"]])
    g.add_edge("item", END)
    return g.compile(checkpointer=checkpointer)


def lg_doc(checkpointer: Any) -> Any:
    from langgraph.graph import END, START, StateGraph

    g = StateGraph(LGState)
    for i in range(3):
        g.add_node(f"n{i}", lambda s: {"n": len(s["doc"])})
        g.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
    g.add_edge("n2", END)
    return g.compile(checkpointer=checkpointer)


def lg_run(graph: Any, inputs: dict[str, Any], limit: int = 100) -> Callable[[], object]:
    return lambda: graph.invoke(inputs, {"configurable": {"thread_id": uuid.uuid4().hex},
                                         "recursion_limit": limit}, durability="sync")


def raw(wf: Callable[..., Any], *args: Any) -> Callable[[], object]:
    return lambda: DBOS.start_workflow(wf, *args).get_result()


@contextmanager
def langgraph_saver(url: str) -> Iterator[Any]:
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(url, max_size=20, open=True,
                          kwargs={"autocommit": True, "prepare_threshold": 0,
                                  "row_factory": dict_row})
    try:
        saver = PostgresSaver(pool)
        saver.setup()
        yield saver
    finally:
        pool.close()


# -- measuring ----------------------------------------------------------------------------

class Peaks:
    """Samples the process's threads and the database's connections while a call runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.threads = self.conns = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as con:
            tick = 0
            while not self._stop.is_set():
                self.threads = max(self.threads, threading.active_count() - 1)
                if tick % 10 == 0:
                    row = con.execute("SELECT count(*) - 1 FROM pg_stat_activity "
                                      "WHERE datname = current_database()").fetchone()
                    self.conns = max(self.conns, int(row[0]) if row else 0)
                tick += 1
                time.sleep(0.005)

    @contextmanager
    def watching(self) -> Iterator[Peaks]:
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            self._stop.set()
            sampler.join()


def timed(cases: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """Median wall ms per case, the cases interleaved round by round (after one warm-up)."""
    for f in cases.values():
        f()
    out: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, f in cases.items():
            t0 = time.perf_counter()
            f()
            out[name].append((time.perf_counter() - t0) * 1000)
    return {k: median(v) for k, v in out.items()}


_BYTES = [
    ("dbos.workflow_input", "length(inputs)"), ("dbos.workflow_output", "length(output)"),
    ("dbos.operation_outputs", "length(output)"), ("checkpoint_blobs", "length(blob)"),
    ("checkpoint_writes", "length(blob)"), ("checkpoints", "length(checkpoint::text)"),
]


def written(url: str) -> int:
    """Bytes of inputs, outputs, step rows and LangGraph checkpoints in the database."""
    total = 0
    with psycopg.connect(url, autocommit=True) as con:
        for t, expr in _BYTES:
            try:
                row = con.execute(f"SELECT coalesce(sum({expr}), 0) FROM {t}").fetchone()
                total += int(row[0]) if row else 0
            except psycopg.errors.UndefinedTable:
                pass
    return total


def bytes_per_run(url: str, f: Callable[[], object]) -> int:
    before = written(url)
    f()
    return written(url) - before


# -- the section --------------------------------------------------------------------------

CURVES = ("length", "fanout", "state", "statements", "map")


def section(url: str, only: tuple[str, ...] = CURVES) -> str:
    """Measure the curves named in ``only`` (all by default; the others are kept from the
    JSON file of an earlier run), store them, draw the plot, return the section."""
    from scale_report import render, write_svg

    DATA.clear()
    if only != CURVES and JSON_PATH.exists():
        DATA.update(json.loads(JSON_PATH.read_text()))
    DATA.setdefault("meta", {}).update(
        quick=QUICK, rounds=ROUNDS, one_round_from=LARGE,
        **({"started": _now(), "load_before": _load()} if only == CURVES else {}))
    app = App("bench-scale", url)
    seqs = {n: app.pipeline(f"seq{n}", _chain(n)) for n in LENGTHS}
    fans = {w: app.pipeline(f"fan{w}", _fan(w)) for w in WIDTHS}
    branch = fn(noop, name="s0") >> fn(noop, name="s1") >> fn(noop, name="s2")
    par3x3 = app.pipeline("par3x3", (branch | branch | branch) >> fn(noop, name="join"))
    doc3 = app.pipeline("doc3", fn(touch) >> fn(touch, name="t2") >> fn(touch, name="t3"))
    docmap = app.pipeline("docmap", map_over("items", fn(touch) >> fn(touch, name="t2"), "out"))
    with langgraph_saver(url) as saver, app:
        if "length" in only:
            _lengths(seqs, saver)
        if "fanout" in only:
            _fanouts(fans, par3x3, saver)
        if "state" in only:
            _states(url, doc3, docmap, saver)
        if "statements" in only:
            _statements(app, seqs[max(n for n in LENGTHS if n <= 100)])
    if "map" in only:  # the longest curve last: the others are on file if it stops
        _maps(url)
    if only == CURVES:
        DATA["meta"].update(finished=_now(), load_after=_load())
    JSON_PATH.write_text(json.dumps(DATA, indent=1) + "\n")
    svg = write_svg(DATA, JSON_PATH.with_suffix(".svg"))
    return render(DATA, svg.name)


@contextmanager
def _counting(app: App, check_every_step: bool) -> Iterator[list[int]]:
    """Count the statements durapipe's step writer sends; optionally check before every
    step (the two-statement path of before the frontier)."""
    log = app.step_log()
    assert log is not None
    calls = [0]
    send, must = log._execute, log.must_check

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return send(*args, **kwargs)

    log._execute = counted  # type: ignore[method-assign]
    if check_every_step:
        log.must_check = lambda step: True  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        log._execute, log.must_check = send, must  # type: ignore[method-assign]


def _statements(app: App, pipeline: Any) -> None:
    n = len(pipeline.node.nodes) if hasattr(pipeline.node, "nodes") else 1
    counts: dict[str, int] = {}

    def case(check: bool, label: str) -> Callable[[], object]:
        def run() -> object:
            with _counting(app, check) as calls:
                pipeline.run({})
            counts[label] = calls[0]
            return None
        return run

    starting("statements")
    cases = {"one statement per new step": case(False, "one statement per new step"),
             "check + record per step": case(True, "check + record per step")}
    t = timed(cases, ROUNDS * 3)
    record("statements", nodes=n, ms=t, statements=counts, rounds=ROUNDS * 3)


def _chain(n: int) -> Any:
    node = fn(noop, name="n0")
    for i in range(1, n):
        node = node >> fn(noop, name=f"n{i}")
    return node


def _fan(w: int) -> Any:
    node = fn(noop, name="b0")
    for i in range(1, w):
        node = node | fn(noop, name=f"b{i}")
    return node >> fn(noop, name="join")


def _lengths(seqs: dict[int, Any], saver: Any) -> None:
    """Every size in ROUNDS rounds (1,000 nodes is seconds, not minutes, for each system)."""
    starting("length")
    ms: dict[str, list[float]] = {}
    for n in LENGTHS:
        graph = lg_chain(n, saver)
        t = timed({"durapipe": lambda n=n: seqs[n].run({}), "raw DBOS": raw(raw_seq, n),
                   "LangGraph": lg_run(graph, {"trail": []}, n + 10)}, ROUNDS)
        for k, v in t.items():
            ms.setdefault(k, []).append(v)
        done = LENGTHS[:len(ms["durapipe"])]
        record("length", sizes=done, rounds=[ROUNDS] * len(done), ms=ms)


SYSTEMS = ("durapipe", "raw DBOS", "LangGraph")


def map_case(url: str, system: str, steps: int, n: int) -> dict[str, float]:
    """One map size of one system, in a process of its own (so the threads a pool kept from
    an earlier case do not count): median ms, peak threads and peak connections."""
    rounds = rounds_for(n)
    with contextlib.ExitStack() as stack:
        make: Callable[[int], Callable[[], object]]
        if system == "LangGraph":
            graph = lg_map(steps, stack.enter_context(langgraph_saver(url)))
            make = lambda k: lg_run(graph, {"items": list(range(k))}, 50)  # noqa: E731
        else:
            app = App("bench-scale-map", url)
            body = fn(noop) if steps == 1 else fn(noop) >> fn(noop, name="b") >> fn(noop, name="c")
            pipeline = app.pipeline(f"map{steps}", map_over("items", body, "out"))
            stack.enter_context(app)
            if system == "durapipe":
                make = lambda k: lambda: pipeline.run({"items": list(range(k))})  # noqa: E731
            elif steps == 1:
                make = lambda k: raw(raw_gather, k)  # noqa: E731
            else:
                make = lambda k: raw(raw_children, k, 3)  # noqa: E731
        make(2)()  # warm-up
        f = make(n)
        times = []
        peaks = Peaks(url)
        with peaks.watching():
            for _ in range(rounds):
                t0 = time.perf_counter()
                f()
                times.append((time.perf_counter() - t0) * 1000)
    return {"ms": median(times), "threads": peaks.threads, "conns": peaks.conns, "rounds": rounds}


def _map_subprocess(url: str, name: str, steps: int, n: int) -> dict[str, Any]:
    """One map case in a child process; a case that fails or runs past MAP_TIMEOUT is
    returned as such (with the last line it wrote) instead of stopping the bench."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, __file__, "--map-case", url, name, str(steps), str(n),
           *(["--quick"] if QUICK else [])]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=MAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {MAP_TIMEOUT} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode} after {time.perf_counter() - t0:.0f} s: {last[:160]}"}
    got: dict[str, Any] = json.loads(lines[-1])
    got["pool_timeouts"] = done.stderr.count("timeout")
    return got


def _maps(url: str) -> None:
    starting("map")
    got: dict[str, dict[str, list[Any]]] = {}
    cases = [(steps, n, name) for steps in (1, 3) for n in ITEMS for name in SYSTEMS]
    if QUICK:  # the largest size for durapipe alone: threads and connections stay bounded
        cases.append((1, 10_000, "durapipe"))
    for steps, n, name in cases:
        r = _map_subprocess(url, name, steps, n)
        print(f"map {steps}-step {n} {name}: {r}", file=sys.stderr, flush=True)
        got.setdefault(f"{steps}-step", {}).setdefault(name, []).append({"items": n, **r})
        record("map", cases=got)


def _fanouts(fans: dict[int, Any], par3x3: Any, saver: Any) -> None:
    starting("fanout")
    ms: dict[str, list[float]] = {}
    for w in WIDTHS:
        graph = lg_fanout(w, saver)
        t = timed({"durapipe": lambda w=w: fans[w].run({}),
                   "raw DBOS (gather of async steps)": raw(raw_gather, w),
                   "raw DBOS (child workflows, handle.get_result)": raw(raw_children, w, 1),
                   "LangGraph": lg_run(graph, {"trail": []})})
        for k, v in t.items():
            ms.setdefault(k, []).append(v)
        record("fanout", sizes=WIDTHS[:len(ms["durapipe"])], ms=ms, rounds=ROUNDS)
    starting("par3x3")
    t = timed({"durapipe": lambda: par3x3.run({}),
               "raw DBOS (gather of one coroutine per branch)": raw(raw_par3x3, False),
               "raw DBOS (child workflows, handle.get_result)": raw(raw_par3x3, True)}, ROUNDS * 3)
    record("par3x3", ms=t, rounds=ROUNDS * 3)


def _states(url: str, doc3: Any, docmap: Any, saver: Any) -> None:
    starting("state")
    graph = lg_doc(saver)
    got: dict[str, list[int]] = {}
    for size in STATES:
        doc = "x" * size
        cases = {"durapipe, 3 nodes": lambda d=doc: doc3.run({"doc": d}),
                 "raw DBOS, 3 steps": raw(raw_doc, doc),
                 "LangGraph, 3 nodes": lg_run(graph, {"doc": doc}),
                 "durapipe, map of 10 items x 2 steps": lambda d=doc: docmap.run(
                     {"doc": d, "items": list(range(10))})}
        for name, f in cases.items():
            got.setdefault(name, []).append(bytes_per_run(url, f))
        record("state", sizes=STATES[:len(got["durapipe, 3 nodes"])], bytes=got)


if __name__ == "__main__":
    from common import fresh_database, postgres_server

    if "--map-case" in sys.argv:
        at = sys.argv.index("--map-case")
        db, system, steps, n = sys.argv[at + 1:at + 5]
        print(json.dumps(map_case(db, system, int(steps), int(n))))
        sys.exit(0)

    only = CURVES
    for arg in sys.argv:  # --only=length,fanout: measure these again, keep the rest on file
        if arg.startswith("--only="):
            only = tuple(c for c in CURVES if c in arg.split("=", 1)[1].split(","))
    with postgres_server() as server, fresh_database(server) as db:
        print(section(db, only))
