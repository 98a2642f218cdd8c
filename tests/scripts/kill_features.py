"""Runs through map_over, a loop, a route and a dispatch joined with a timeout; SIGKILL mid-flight.

Usage: kill_features.py DATABASE_URL LOG_PATH RUNS KILL_AT STEPS
Pipeline: a >> map_over(xs, m) >> l * until(n == 3) >> route(lang, en: r, fr: r)
>> dispatch(bg) >> join(timeout=60) >> e, on ``App(steps=STEPS)`` ("lean" or "dbos").
Each step appends ``run:label`` to the log after its work: ``m<item>`` per map item,
``l<n>`` per loop pass, the others their name. KILL_AT is a number N or a ``run:label``:
the process kills itself with SIGKILL right after that line (before DBOS records that
step). With KILL_AT = 0 it recovers, starts the same run ids again and waits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from side_effects import KillingLog, start_then_die_or_finish

from durapipe import App, dispatch, fn, join, map_over, route, until

url, log, runs, kill_at, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
killing = KillingLog(log, kill_at)


def effect(state: dict[str, Any], label: str) -> None:
    killing.write(f"{state['run']}:{label}")


def a(state: dict[str, Any]) -> dict[str, Any]:
    effect(state, "a")
    return {"xs": [0, 1, 2], "n": 0}


def m(state: dict[str, Any]) -> dict[str, Any]:
    effect(state, f"m{state['item']}")
    return {"sq": state["item"] ** 2}


def loop(state: dict[str, Any]) -> dict[str, Any]:
    effect(state, f"l{state['n'] + 1}")
    return {"n": state["n"] + 1}


def r(state: dict[str, Any]) -> dict[str, Any]:
    effect(state, "r")
    return {"routed": state["lang"]}


def bg(state: dict[str, Any]) -> dict[str, Any]:
    effect(state, "bg")
    return {"bg": True}


def e(state: dict[str, Any]) -> dict[str, Any]:
    effect(state, "e")
    return {"e": [d["sq"] for d in state["ms"]] + [state["n"], state["routed"], state["bg"]]}


LABELS = ["a", "m0", "m1", "m2", "l1", "l2", "l3", "r", "bg", "e"]
app = App("kill-features", url, steps=steps)
pipeline = app.pipeline(
    "features",
    fn(a) >> map_over("xs", fn(m), "ms") >> fn(loop) * until(lambda s: s["n"] >= 3, max=5)
    >> route("lang", {"en": fn(r, name="r_en"), "fr": fn(r, name="r")})
    >> dispatch(fn(bg)) >> join(timeout=60) >> fn(e),
)

if __name__ == "__main__":
    with app:
        assert (app.step_log() is not None) is (steps == "lean"), "the App took the other step path"
        results = start_then_die_or_finish(pipeline, runs, "f", kill_at, ["e"], {"lang": "fr"})
        assert all(res.state["e"] == [0, 1, 4, 3, "fr", True] for res in results), results
        print("ALL DONE", flush=True)
