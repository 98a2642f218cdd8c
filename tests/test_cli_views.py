"""The CLI's views at known moments of a run whose steps wait for the test: the live table
of `durapipe run` (pending until reached, running while in flight, one status per join and
gate, tokens of task agents, n/n at the end) and `durapipe show` (one line per gate with
its outcome, start offsets, a text timeline)."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dbutil import wait_for
from durapipe import Agent, App, FakeModel, Pipeline, dispatch, fn, gate, join
from durapipe._render import live_table
from durapipe.cli import cli
from durapipe.engine.admin import Admin

HOLD = threading.Event()


def first(state: dict[str, Any]) -> dict[str, Any]:
    return {"draft": "a draft"}


def hold(state: dict[str, Any]) -> dict[str, Any]:
    HOLD.wait(60)
    return {"held": True}


def last(state: dict[str, Any]) -> dict[str, Any]:
    return {"done": True}


def rows(table: Any) -> dict[str, tuple[str, str]]:
    """node path -> (status text, model/tokens) as the table prints them."""
    console = Console(width=200, record=True, color_system=None, file=io.StringIO())
    console.print(table)
    out = {}
    for line in console.export_text().splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip() != ""]
        if cells and re.fullmatch(r"[\d.]+", cells[0]):
            out[cells[0]] = (cells[2], cells[4] if len(cells) > 4 else "")
    return out


def title(table: Any) -> str:
    return str(table.title)


def test_live_table_and_show_at_each_moment(make_app: Callable[..., App], database_url: str) -> None:
    HOLD.clear()
    app = make_app("cli-views", model=FakeModel({"summarizer": "short summary"}))
    node = (fn(first) >> fn(hold) >> dispatch(Agent("summarizer").instruct("Sum up {draft}").writes("summary"),
                                              names=["sum"])
            >> gate("ok", "Ship it?", approvers=["alice"]) >> join("sum") >> fn(last))
    app.pipeline("views", node)
    with app, Admin(database_url) as admin:
        handle = Pipeline(app, app.registered("views")).start({}, run_id="v1")
        # moment 1: the first step is done, the second is in flight, nothing else reached
        wait_for(lambda: rows(live_table(node, admin.tree("v1"), "PENDING")).get("0.0", ("",))[0]
                 == "✓ SUCCESS", what="the first step")
        table = live_table(node, admin.tree("v1"), "PENDING")
        assert {p: s for p, (s, _) in rows(table).items()} == {
            "0.0": "✓ SUCCESS", "0.1": "… RUNNING", "0.2.0": "· pending", "0.3": "· pending",
            "0.4": "· pending", "0.5": "· pending"}
        assert title(table).startswith("1/6 nodes done")
        # moment 2: waiting at the gate; the background task done with its tokens
        HOLD.set()
        wait_for(lambda: app.pending("v1"), what="the gate")
        wait_for(lambda: rows(live_table(node, admin.tree("v1"), "PENDING"))["0.2.0"][0] == "✓ SUCCESS",
                 what="the background task")
        now = rows(live_table(node, admin.tree("v1"), "PENDING"))
        assert now["0.3"][0] == "⏸ WAITING" and now["0.4"][0] == "· pending"
        assert re.fullmatch(r"fake \d+→\d+", now["0.2.0"][1]), now["0.2.0"]
        res = CliRunner().invoke(cli, ["show", "v1", "--database-url", database_url], env={"COLUMNS": "200"})
        gate_lines = [line for line in res.output.splitlines() if "[gate]" in line]
        assert len(gate_lines) == 1 and "WAITING" in gate_lines[0]  # the gate, once
        assert "task sum: success, not joined yet" in res.output     # done, its join not reached
        # the exact command: the gate's only approver, the database given to show
        assert f"answer: durapipe approve v1 ok --by alice --database-url {shlex.quote(database_url)}" in res.output
        app.approve("v1", "ok", by="alice")
        handle.result(timeout=30)
        # moment 3: finished: every node done, the join and gate resolved
        table = live_table(node, admin.tree("v1"), "SUCCESS")
        final = {p: s for p, (s, _) in rows(table).items()}
        assert final == {"0.0": "✓ SUCCESS", "0.1": "✓ SUCCESS", "0.2.0": "✓ SUCCESS",
                         "0.3": "✓ APPROVED", "0.4": "✓ SUCCESS", "0.5": "✓ SUCCESS"}
        assert title(table).startswith("6/6 nodes done")
    res = CliRunner().invoke(cli, ["show", "v1", "--database-url", database_url], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    gate_lines = [line for line in res.output.splitlines() if " ok " in f" {line} " and "[gate]" in line]
    assert len(gate_lines) == 1 and "APPROVED" in gate_lines[0] and "by=alice" in gate_lines[0]
    assert "0.3 ok" in gate_lines[0]                                   # at the gate's own path
    assert re.search(r"0\.1 hold .*@\+\d", res.output)                 # start offsets
    assert re.search(r"timeline 0 → \S+\n", res.output)
    assert re.search(r"0\.1 hold\s+ *█", res.output)                   # a bar per step
    # the gate is one bar too, from its request to the approval
    assert len(re.findall(r"^0\.3 gate ok +█", res.output, re.M)) == 1
    assert not re.search(r"^(0\.3 ok|gate ok) ", res.output, re.M)
    assert len(re.findall(r"^0\.4 join +█", res.output, re.M)) == 1  # the join: its start and end events


@pytest.fixture
def blog_app(database_url: str) -> Iterator[Any]:
    """``ops.blog_app`` on this test's database, its held step closed; afterwards released
    and shut down."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ops import blog_app

    blog_app.app.database_url = database_url
    blog_app.release.clear()
    try:
        yield blog_app
    finally:
        blog_app.release.set()
        blog_app.app.shutdown()


def test_show_with_the_app_marks_the_step_in_flight(blog_app: Any, database_url: str,
                                                     tmp_path: Path) -> None:
    log = tmp_path / "log"
    with blog_app.app:
        handle = blog_app.hold.start({"log": str(log)}, run_id="hold-1")
        wait_for(lambda: log.exists(), what="the held step to start")
        res = CliRunner().invoke(cli, ["show", "hold-1", "--app", "ops.blog_app",
                                       "--database-url", database_url], env={"COLUMNS": "200"})
        blog_app.release.set()
        handle.result(timeout=30)
    assert res.exit_code == 0, res.output
    assert re.search(r"0/2 nodes done · run PENDING", res.output)
    assert re.search(r"0\.0 +│ wait_for_release +│ … RUNNING", res.output), res.output
    assert re.search(r"0\.1 +│ finish +│ · pending", res.output)


@pytest.mark.slow
def test_show_follow_lists_the_step_in_flight(blog_app: Any, database_url: str,
                                               tmp_path: Path) -> None:
    """`durapipe show --follow` in a terminal (a pty) lists the step at work while it works."""
    log = tmp_path / "log"
    main, child = pty.openpty()
    seen = b""

    def read_until(pattern: bytes) -> bool:
        nonlocal seen
        while select.select([main], [], [], 0.2)[0]:
            try:
                seen += os.read(main, 65536)
            except OSError:  # the follower exited and closed the terminal
                break
        return re.search(pattern, seen) is not None

    try:
        with blog_app.app:
            handle = blog_app.hold.start({"log": str(log)}, run_id="hold-2")
            wait_for(lambda: log.exists(), what="the held step to start")
            env = dict(os.environ, COLUMNS="200", TERM="xterm")
            proc = subprocess.Popen([sys.executable, "-m", "durapipe.cli", "show", "hold-2", "--follow",
                                     "--database-url", database_url], stdin=child, stdout=child,
                                    stderr=child, env=env)
            wait_for(lambda: read_until(rb"running \S*0\.0 wait_for_release \(fn\) \d"), timeout=60,
                     what="the follower to list the step in flight")
            blog_app.release.set()
            handle.result(timeout=30)
            assert proc.wait(timeout=60) == 0
            read_until(rb"$")
    finally:
        blog_app.release.set()
        os.close(child)
        os.close(main)
    assert b"SUCCESS" in seen
