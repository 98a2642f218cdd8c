"""The five audit queries of the README, run as printed against a database with real runs:
a published post (agents, a parallel branch, steps), a failed run, and three gates
(approved, rejected, still waiting while the app runs)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dbutil import sql, wait_for
from durapipe import GateRejected, NodeFailed
from durapipe.audit import install_views
from ops import blog_app, gates_app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_queries() -> dict[str, str]:
    """The README's audit queries by their comment line."""
    block = re.search(r"Five audit queries:\s*```sql\n(.*?)```", README.read_text(), re.S)
    assert block, "the README's audit queries are gone"
    parts = re.findall(r"^-- ([^\n]+)\n(.*?)(?=^-- |\Z)", block.group(1), re.S | re.M)
    return {title.strip(): query.strip() for title, query in parts}


@pytest.fixture
def recorded(database_url: str) -> Iterator[str]:
    """The runs, with the gates app still launched (its third run waits at the gate)."""
    for app in (blog_app.app, gates_app.app):
        app.database_url = database_url
    try:
        with blog_app.app:
            blog_app.publish.run({"topic": "durable AI"}, run_id="p1")
            with pytest.raises(NodeFailed):
                blog_app.broken.run({}, run_id="b1")
    finally:
        blog_app.app.shutdown()
    try:
        with gates_app.app as app:
            handles = {r: gates_app.review.start({"title": r}, run_id=r) for r in ("g-ok", "g-no", "g-wait")}
            wait_for(lambda: len(app.pending()) == 3, what="three gates waiting")
            app.approve("g-ok", "legal", by="alice", comment="fine")
            assert handles["g-ok"].result(timeout=30).state["published"] is True
            app.reject("g-no", "legal", by="alice", comment="not yet")
            with pytest.raises(GateRejected):
                handles["g-no"].result(timeout=30)
            install_views(database_url)
            yield database_url
    finally:
        gates_app.app.shutdown()


def run(url: str, queries: dict[str, str], title: str) -> list[tuple[Any, ...]]:
    return sql(url, queries[title])


def test_the_readme_audit_queries_answer_what_they_say(recorded: str) -> None:
    queries = readme_queries()
    assert len(queries) == 5, list(queries)

    slowest = run(recorded, queries, "slowest nodes this week")
    assert {r[:4] for r in slowest} == {
        ("publish", "0.0", "writer", 1), ("publish", "0.1.0", "editor", 1),
        ("publish", "0.1.1.0", "count", 1), ("publish", "0.1.1.1", "double", 1),
        ("publish", "0.2", "finish", 1), ("broken", "0", "explode", 1),
        ("review", "0.0", "legal", 3), ("review", "0.1", "publish", 1)}  # the gate's own step, per run
    assert [r[4] for r in slowest] == sorted((r[4] for r in slowest), reverse=True)

    # writer: 2 prompt tokens, 5 answer tokens; editor: 0 and 2 (FakeModel counts words).
    assert run(recorded, queries, "tokens per run (join your prices per model)") == [("p1", "publish", 2, 7)]

    failed = run(recorded, queries, "runs that failed today")
    assert [(r[0], r[1], r[3]) for r in failed] == [
        ("g-no", "review", "GateRejected: gate 0.0:legal was rejected by 'alice': not yet"),
        ("b1", "broken", "NodeFailed: node 0:explode failed: ValueError: no luck today")]

    decided = run(recorded, queries, "who approved or rejected what")
    assert [r[1:] for r in decided] == [("alice", "rejected", "legal", "g-no", "not yet"),
                                        ("alice", "approved", "legal", "g-ok", "fine")]
    assert decided[0][0] >= decided[1][0]

    waiting = run(recorded, queries, "gates waiting for a human, oldest first")
    assert [r[:4] for r in waiting] == [("g-wait", "review", "legal", "Publish g-wait?")]
