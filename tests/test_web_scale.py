"""The console's runs list at 100,000 runs: keyset pages, a time range among them, read the
run keys indexes backwards from the cursor (the plan is checked, never a timing), filters
and deep pages return the right rows, and the newer runs of another app on the database
never show."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import psycopg

from durapipe import App, fn
from durapipe.engine.admin import Admin
from durapipe.web.queries import RunFilter, list_page

N = 100_000
T0 = 1_700_000_000_000
APP = "web-scale"  # the DBOS name of the app below, which owns the bulk runs


def noop(state: dict[str, object]) -> None:
    return None


def test_pages_use_the_run_keys_indexes_at_100k_runs(make_app: Callable[..., App], database_url: str) -> None:
    app = make_app("web-scale")
    app.pipeline("p", fn(noop))
    with app:  # creates DBOS's tables
        pass
    with psycopg.connect(database_url, autocommit=True) as con:
        con.execute(f"""INSERT INTO dbos.workflow_status (workflow_uuid, status, name, created_at,
                                                           application_name)
            SELECT 'bulk-' || lpad(g::text, 6, '0'), CASE WHEN g % 10 = 0 THEN 'ERROR' ELSE 'SUCCESS' END,
                   'durapipe.run', {T0} + g * 1000, 'web-scale' FROM generate_series(1, {N}) g
            UNION ALL
            SELECT 'other-' || g, 'SUCCESS', 'durapipe.run', {T0} + ({N} + g) * 1000, 'web-scale-eu'
            FROM generate_series(1, 20) g""")
        con.execute(f"""INSERT INTO dbos.workflow_input (workflow_uuid, inputs)
            SELECT 'bulk-' || lpad(g::text, 6, '0'),
                   '{{"positionalArgs": ["p' || (g % 3) || '", "v", {{"n": "item-' || g || '"}}, "0"]}}'
            FROM generate_series(1, {N}) g
            UNION ALL
            SELECT 'other-' || g, '{{"positionalArgs": ["p0", "v", {{}}, "0"]}}'
            FROM generate_series(1, 20) g""")
        con.execute("ANALYZE dbos.workflow_status")
        con.execute("ANALYZE dbos.workflow_input")
        con.execute("ANALYZE durapipe.run_keys")
        deep = RunFilter(APP, status="SUCCESS", pipeline="p1", cursor=f"{T0 + 50_000 * 1000}:bulk-050000")
        hour = RunFilter(APP, since=datetime.fromtimestamp((T0 + 60_000_000) / 1000, timezone.utc),
                         until=datetime.fromtimestamp((T0 + 63_600_000) / 1000, timezone.utc))
        for flt in (RunFilter(APP), deep, hour):
            plan = "\n".join(r[0] for r in con.execute("EXPLAIN " + flt.sql(), flt.params(51)).fetchall())
            assert "Scan Backward using run_keys_" in plan, plan
            assert "Seq Scan" not in plan, plan
    with Admin(database_url) as admin:
        first, cursor = list_page(admin, RunFilter(APP), 50)
        assert [r.run_id for r in first[:2]] == ["bulk-100000", "bulk-099999"] and len(first) == 50
        second, _ = list_page(admin, RunFilter(APP, cursor=cursor), 50)
        assert second[0].run_id == "bulk-099950"
        rows, nxt = list_page(admin, deep, 5)
        # below 50,000, pipeline p1 (n % 3 == 1), not a multiple of 10
        assert [r.run_id for r in rows] == ["bulk-049999", "bulk-049996", "bulk-049993", "bulk-049987",
                                            "bulk-049984"]
        assert all(r.pipeline == "p1" and r.status == "SUCCESS" for r in rows) and nxt
        window, _ = list_page(admin, hour, 50)  # runs 60,000 to 63,599, newest first
        assert [r.run_id for r in window[:2]] == ["bulk-063599", "bulk-063598"] and len(window) == 50
        found, _ = list_page(admin, RunFilter(APP, text="item-77777"), 5)
        assert [r.run_id for r in found] == ["bulk-077777"]
        eu, _ = list_page(admin, RunFilter("web-scale-eu"), 50)
        assert [r.run_id for r in eu] == [f"other-{g}" for g in range(20, 0, -1)]
