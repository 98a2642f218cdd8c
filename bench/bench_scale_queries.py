"""Queries against a growing history: one-run lookups in the audit views, `durapipe runs -p`
(one keyset page), and the README's five audit queries at 1k, 10k and 100k recorded runs,
beside DBOS's own primary-key lookup of one workflow.

Runs are bulk-inserted by SQL modelled on what a real run of a two-node pipeline with a
child workflow writes (status, input, two operation rows, a child workflow with its own
status and input), through DBOS's tables, so durapipe's trigger keys them as it keys real
runs. Every tenth run failed. Sizes: ``DURAPIPE_BENCH_QUERY_SIZES`` (default 1000,10000,100000).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from common import interleave, median, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from durapipe import App, fn  # noqa: E402
from durapipe.audit import install_views  # noqa: E402
from durapipe.engine.runlist import RunQuery  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
PIPE = "CASE WHEN g % 100 = 55 THEN 'beta' ELSE 'alpha' END"
# `durapipe runs` pages: a common filter, a rare pipeline, a status, and a filter no run matches.
PAGES = {
    "-p alpha --status SUCCESS": RunQuery(pipeline="alpha", status="SUCCESS"),
    "-p beta (1 run in 100)": RunQuery(pipeline="beta"),
    "--status ERROR (1 run in 10)": RunQuery(status="ERROR"),
    "-p beta --status ERROR (none)": RunQuery(pipeline="beta", status="ERROR"),
}


def readme_queries() -> dict[str, str]:
    block = re.search(r"Five audit queries:\s*```sql\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    parts = re.findall(r"^-- ([^\n]+)\n(.*?)(?=^-- |\Z)", block.group(1), re.S | re.M)
    return {title.strip(): query.strip() for title, query in parts}


def add_runs(con: psycopg.Connection[Any], first: int, last: int, now_ms: int) -> None:
    """Runs r<first>..r<last>, one second apart going back from now: one in 100 of pipeline
    beta (never failed), the others of alpha, one in 10 failed."""
    rng = f"generate_series({first}, {last}) g"
    con.execute(f"""
        INSERT INTO dbos.workflow_status (workflow_uuid, status, name, created_at, completed_at,
                                          application_name, application_version, executor_id,
                                          parent_workflow_id)
        SELECT 'r' || g, CASE WHEN g % 10 = 0 THEN 'ERROR' ELSE 'SUCCESS' END,
               'durapipe.run:' || {PIPE}, {now_ms} - g * 1000, {now_ms} - g * 1000 + 40,
               'bench-queries', 'v', 'local', NULL FROM {rng}
        UNION ALL
        SELECT 'r' || g || '/0.1:b', 'SUCCESS', 'durapipe.run', {now_ms} - g * 1000 + 5,
               {now_ms} - g * 1000 + 30, 'bench-queries', 'v', 'local', 'r' || g FROM {rng}""")
    con.execute(f"""
        INSERT INTO dbos.workflow_input (workflow_uuid, inputs)
        SELECT 'r' || g, '{{"positionalArgs": ["' || {PIPE} || '", "s1", {{"topic": "item ' || g || '"}}]}}'
        FROM {rng}
        UNION ALL
        SELECT 'r' || g || '/0.1:b',
               '{{"positionalArgs": ["' || {PIPE} || '", "s1", {{"topic": "item ' || g || '"}}, "0.1", "r' || g || '"]}}'
        FROM {rng}""")
    con.execute(f"""
        INSERT INTO dbos.workflow_output (workflow_uuid, output, error)
        SELECT 'r' || g, CASE WHEN g % 10 = 0 THEN NULL ELSE '{{"done": true}}' END,
               CASE WHEN g % 10 = 0 THEN '{{"name": "NodeFailed", "message": "node 0.0:a failed"}}' END
        FROM {rng}""")
    con.execute(f"""
        INSERT INTO dbos.operation_outputs (workflow_uuid, function_id, function_name, output,
                                            started_at_epoch_ms, completed_at_epoch_ms,
                                            child_workflow_id)
        SELECT 'r' || g, 0, '0.0:a',
               '{{"model": "fake", "input_tokens": 3, "output_tokens": 7, "text": "t"}}',
               {now_ms} - g * 1000 + 1, {now_ms} - g * 1000 + 4, NULL FROM {rng}
        UNION ALL
        SELECT 'r' || g, 1, 'durapipe.run', NULL, {now_ms} - g * 1000 + 5,
               {now_ms} - g * 1000 + 6, 'r' || g || '/0.1:b' FROM {rng}
        UNION ALL
        SELECT 'r' || g || '/0.1:b', 0, '0.1.0:b', '{{"b": 1}}', {now_ms} - g * 1000 + 6,
               {now_ms} - g * 1000 + 29, NULL FROM {rng}""")
    for t in ("dbos.workflow_status", "dbos.workflow_input", "dbos.workflow_output",
              "dbos.operation_outputs", "durapipe.run_keys"):
        con.execute(f"ANALYZE {t}")


def buffers(con: psycopg.Connection[Any], query: str, params: Any) -> int:
    """The shared buffers one execution of ``query`` touches (hit + read; its top node's
    count, planning not included)."""
    plan = [r[0] for r in con.execute("EXPLAIN (ANALYZE, BUFFERS) " + query, params).fetchall()]
    top = next((line for line in plan if line.strip().startswith("Buffers:")), "")
    return sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", top))


def timer(con: psycopg.Connection[Any], query: str, params: Any, prepare: bool) -> Callable[[], Any]:
    return lambda: con.execute(query, params, prepare=prepare).fetchall()


def start_cost(app: App, pipeline: Any, con: psycopg.Connection[Any], rounds: int) -> list[list[str]]:
    """A one-step run started and finished, with durapipe's keying triggers (keys at start,
    status at each change) and with them disabled, interleaved: what keying adds to a run."""
    out: dict[str, list[float]] = {"with run keys": [], "trigger disabled": []}
    for i in range(rounds + 5):
        for mode in out:
            action = "ENABLE" if mode == "with run keys" else "DISABLE"
            con.execute(f"ALTER TABLE dbos.workflow_input {action} TRIGGER durapipe_run_keys")
            con.execute(f"ALTER TABLE dbos.workflow_status {action} TRIGGER durapipe_run_keys_status")
            t0 = time.perf_counter()
            pipeline.run({"n": i})
            if i >= 5:
                out[mode].append((time.perf_counter() - t0) * 1000)
    con.execute("ALTER TABLE dbos.workflow_input ENABLE TRIGGER durapipe_run_keys")
    con.execute("ALTER TABLE dbos.workflow_status ENABLE TRIGGER durapipe_run_keys_status")
    base = median(out["trigger disabled"])
    return [[mode, f"{median(xs):.2f}", f"{median(xs) / base:.2f}x"] for mode, xs in out.items()]


def section(database_url: str) -> str:
    sizes = [int(s) for s in os.environ.get("DURAPIPE_BENCH_QUERY_SIZES", "1000,10000,100000").split(",")]
    app = App("bench-queries", database_url=database_url)
    alpha = app.pipeline("alpha", fn(lambda s: {"a": 1}, name="a"))
    with app, psycopg.connect(database_url, autocommit=True) as con:
        starts = start_cost(app, alpha, con, rounds=100)
    install_views(database_url)
    audit = readme_queries()
    now_ms = int(time.time() * 1000)
    rows: list[list[str]] = []
    base: dict[str, float] = {}
    base_blocks: dict[str, int] = {}
    done = 0
    insert_s: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as con:
        for size in sizes:
            t0 = time.perf_counter()
            add_runs(con, done + 1, size, now_ms)
            insert_s.append(f"{size - done:,} runs in {time.perf_counter() - t0:.1f} s")
            done = size
            one = f"r{size // 2}"
            # The console's text filter reads the recorded inputs of every run the other
            # filters leave (no index on the text): one run's topic, and a text no run has.
            has_text = RunQuery(text=f"item {size // 2}\"")
            no_text = RunQuery(text="no run has this")
            queries: dict[str, tuple[str, Any]] = {
                "DBOS primary key (workflow_status)": (
                    "SELECT * FROM dbos.workflow_status WHERE workflow_uuid = %s", (one,)),
                "durapipe.runs WHERE run_id =": ("SELECT * FROM durapipe.runs WHERE run_id = %s", (one,)),
                "durapipe.steps WHERE run_id =": ("SELECT * FROM durapipe.steps WHERE run_id = %s", (one,)),
            }
            pages = {f"runs {title} (one page)": (q.sql(), q.params(51)) for title, q in PAGES.items()}
            queries.update(pages)
            heavy: dict[str, tuple[str, Any]] = {}
            for title, text in audit.items():
                # The aggregates read the whole window: fewer rounds for them.
                into = heavy if title in ("slowest nodes this week",
                                          "tokens per run (join your prices per model)",
                                          "runs that failed today") else queries
                into[f"README: {title}"] = (text, None)
            heavy["runs list: text in inputs, one run has it"] = (has_text.sql(), has_text.params(51))
            heavy["runs list: text in inputs, no run has it"] = (no_text.sql(), no_text.params(51))

            def timed(found: dict[str, tuple[str, Any]], pages: dict[str, Any] = pages) -> dict[str, Any]:
                # A runs page is planned at every execution, as `durapipe runs` and the
                # console plan it (one query per connection): a statement psycopg prepared
                # would be timed with or without planning as Postgres's plan cache chooses.
                return {name: timer(con, q, p, name not in pages) for name, (q, p) in found.items()}
            times = interleave(timed(queries), rounds=50, warmup=5)
            times.update(interleave(timed(heavy), rounds=10 if size <= 10_000 else 3, warmup=1))
            for name, xs in times.items():
                ms = median(xs)
                base.setdefault(name, ms)
                q, p = {**queries, **heavy}[name]
                blocks = buffers(con, q, p)
                base_blocks.setdefault(name, blocks)
                rows.append([name, f"{size:,}", f"{ms:.2f}", f"{ms / base[name]:.2f}x", f"{blocks:,}",
                             f"{blocks / max(1, base_blocks[name]):.2f}x"])
    rows.sort(key=lambda r: (r[0], int(r[1].replace(",", ""))))
    return "\n".join([
        "## Queries against a growing history (bench_scale_queries.py)",
        "",
        "Median milliseconds per query (interleaved rounds, one open connection; the runs",
        "pages planned at every execution, as the CLI and the console run them), and the",
        "ratio to the same query at the smallest size; beside them the shared buffers (8 kB",
        "pages) the query touches (EXPLAIN (ANALYZE, BUFFERS), after the timed rounds), which",
        "no other work on the machine changes. Bulk runs modelled on real rows "
        f"({'; '.join(insert_s)}, through durapipe's keying trigger).",
        "",
        table(rows, ["query", "recorded runs", "median ms", "vs smallest", "buffers", "vs smallest"]),
        "",
        "What keying costs: a one-step run, `pipeline.run` to its result (keys written at start,",
        "status kept at each change), with the triggers and with them disabled, interleaved",
        "(median ms of 100 each).",
        "",
        table(starts, ["run", "median ms", "ratio"]),
        "",
    ])


if __name__ == "__main__":
    # `python bench/bench_scale_queries.py [--keep DBNAME]`: with --keep the history is built
    # in that database (created when absent) and left there, for EXPLAIN afterwards.
    from common import fresh_database, postgres_server

    if "--keep" in sys.argv:
        name = sys.argv[sys.argv.index("--keep") + 1]
        with postgres_server() as server:
            with psycopg.connect(server, autocommit=True) as admin:
                if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                    admin.execute(f'CREATE DATABASE "{name}"')
            kept = urlsplit(server)._replace(path="/" + name).geturl()
            print(section(kept))
            print(f"history kept in database {name}")
    else:
        with postgres_server() as server, fresh_database(server) as url:
            print(section(url))
