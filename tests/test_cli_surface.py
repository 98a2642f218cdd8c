"""The CLI's small truths: `--version`, help text wrapped to the terminal, human request times and the answer command in
`durapipe pending`, and the errors a service catches importable from `durapipe`."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

from typer.testing import CliRunner

import durapipe
from dbutil import wait_for
from durapipe import App
from durapipe.cli import cli

TESTS = Path(__file__).parent


def test_version() -> None:
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"durapipe {version('durapipe')}"


def test_help_prose_wraps_to_the_terminal() -> None:
    # a docstring's own line breaks are not kept: a paragraph wraps where the terminal ends
    res = CliRunner().invoke(cli, ["run", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "says how to resume or follow it; a second Ctrl-C" in res.output, res.output


def test_unknown_ids_are_exported() -> None:
    assert {"UnknownRun", "UnknownGate"} <= set(durapipe.__all__)
    assert issubclass(durapipe.UnknownRun, durapipe.DurapipeError)
    assert issubclass(durapipe.UnknownGate, durapipe.DurapipeError)


def test_pending_prints_human_times_and_the_answer_command(database_url: str) -> None:
    sys.path.insert(0, str(TESTS))
    from ops import gates_app

    app: App = gates_app.app
    app.database_url = database_url
    try:
        with app:
            gates_app.review.start({"title": "T"}, run_id="pend-1")
            wait_for(lambda: app.pending("pend-1"), what="the gate to be pending")
            res = CliRunner().invoke(cli, ["pending", "--database-url", database_url],
                                     env={"COLUMNS": "200"})
            app.reject("pend-1", "legal", by="alice")
    finally:
        app.shutdown()
    assert res.exit_code == 0, res.output
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+(ms|\.\ds) ago\)", res.output), res.output
    assert not re.search(r"\b1\d{12}\b", res.output)  # no epoch milliseconds
    assert "answer: durapipe approve pend-1 legal --by alice --database-url" in res.output


def test_durations_read_as_a_person_would_say_them() -> None:
    from durapipe._render import duration

    assert [duration(ms) for ms in (5, 5_400, 400_000, 4 * 3_600_000, 3 * 86_400_000)] == [
        "5ms", "5.4s", "6.7m", "4.0h", "3.0d"]
