"""The CLI reads the event stream: `durapipe run --tokens` prints the model's text as it
streams, `durapipe show RUN --follow` shows a run started by another process live: its events, and
the step in flight while it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbutil import lines, wait_for
from ops import blog_app, gates_app

OPS = Path(__file__).parent / "ops"


def durapipe(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "durapipe.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_run_tokens_and_show_follow(database_url: str) -> None:
    proc = durapipe("run", f"{OPS / 'blog_app.py'}:publish", "--input", "topic=streams",
                    "--run-id", "cli-ev", "--tokens", "--database-url", database_url)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # token chunks arrive inline, between the writer's start and its end
    assert "a post on streams" in err
    writer = err.index("node_started 0.0 writer")
    assert writer < err.index("a post on") < err.index("node_finished 0.0 writer")
    assert "run_finished 0 publish SUCCESS" in err and '"done": true' in out

    app = gates_app.app
    app.database_url = database_url
    with app:
        gates_app.review.start({"title": "T"}, run_id="cli-gate")
        wait_for(lambda: bool(app.pending("cli-gate")), what="the gate")
        follower = durapipe("show", "cli-gate", "--follow", "--tokens",
                            "--database-url", database_url)
        assert follower.stdout is not None
        seen = []
        for line in follower.stdout:  # the follower shows the run waiting, live
            seen.append(line)
            if "gate_waiting 0.0 legal" in line:
                break
        app.approve("cli-gate", "legal", by="alice")
        out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    text = "".join(seen) + out
    assert text.index("gate_waiting") < text.index("gate_answered 0.0 legal approved")
    assert text.index("gate_answered") < text.index("run_finished 0 review SUCCESS")


@pytest.mark.slow
def test_show_follow_shows_the_step_in_flight_while_it_runs(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "hold.log"
    app = blog_app.app
    app.database_url = database_url
    blog_app.release.clear()
    with app:
        blog_app.hold.start({"log": str(log)}, run_id="cli-hold")
        wait_for(lambda: "hold-start" in lines(log), what="the step to start")
        # a terminal as rich sees one (the live view redraws only on a terminal)
        env = dict(os.environ, TTY_COMPATIBLE="1", TTY_INTERACTIVE="1", NO_COLOR="1",
                   COLUMNS="160")
        follower = subprocess.Popen([sys.executable, "-m", "durapipe.cli", "show", "cli-hold",
                                     "--follow", "--database-url", database_url], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert follower.stdout is not None
        seen = ""
        while "running 0.0 wait_for_release (fn)" not in seen:
            chunk = follower.stdout.readline()
            assert chunk, f"the follower ended before showing the step in flight: {seen}"
            seen += chunk
        blog_app.release.set()  # the step ends only now: it was shown while it ran
        out, err = follower.communicate(timeout=60)
        assert app.get_run("cli-hold").result(timeout=30).state["done"] is True
    assert follower.returncode == 0, err
    assert "finish" in lines(log)
