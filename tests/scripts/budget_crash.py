"""A run with a token budget over a map of agents; the process SIGKILLs itself mid-call.

Usage: budget_crash.py DATABASE_URL LOG_PATH KILL_AT MAX_TOKENS [default]
With ``default`` the map runs at its default concurrency (all six items at once) and each
call is 7 tokens; else one item at a time, 8 tokens a call. The fake model appends the item of each call it answers to LOG_PATH. With KILL_AT = N > 0
the process starts run ``budget-1`` and kills itself inside the N-th model call, after
logging it and before DBOS records it. With KILL_AT = 0 it recovers the run (same executor
id) and prints how it ended.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from durapipe import Agent, App, BudgetExceeded, map_over
from durapipe.models import FakeModel

url, log, kill_at, budget = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
wide = sys.argv[5:] == ["default"]


def answer(request: object) -> str:
    prompt = str(getattr(request, "prompt", ""))
    with open(log, "a") as f:
        f.write(prompt.split()[-1].rstrip(".") + "\n")
    if kill_at and len(log.read_text().splitlines()) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return "four words of output" if wide else "five words of output here"


app = App("budget-crash", url, model=FakeModel({"w": answer}))
agent = Agent("w").instruct("Write about {item}.").writes("text")
pipeline = app.pipeline("p", map_over("items", agent, "texts") if wide
                        else map_over("items", agent, "texts", concurrency=1))

if __name__ == "__main__":
    with app:
        if kill_at:
            pipeline.start({"items": list("abcdef")}, run_id="budget-1", max_tokens=budget)
            import time

            time.sleep(60)
        try:
            app.get_run("budget-1").result(timeout=60)
            print("NO BUDGET ERROR", flush=True)
        except BudgetExceeded as exc:
            print(f"BUDGET used={exc.used} max={exc.max_tokens} {exc}", flush=True)
