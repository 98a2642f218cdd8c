"""The CLI reads the event stream: `durapipe run --tokens` prints the model's text as it
streams, `durapipe show RUN --follow` shows a run started by another process live."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dbutil import wait_for
from ops import gates_app

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
