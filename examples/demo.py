"""The first-run demo: the blog pipeline of the design, durable, on the embedded SQLite default.

Run it with `make demo`. Offline it uses a scripted FakeModel; with GEMINI_API_KEY set it
calls Gemini. Set DURAPIPE_DATABASE_URL=postgresql://... to record on Postgres instead.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any

from durapipe import Agent, App, FakeModel, dispatch, fn, join
from durapipe.models import default_model

fake = FakeModel(
    {
        "content_writer": lambda req: f"Why {req.prompt.split('about ')[-1].rstrip('.')} matters: "
                                      "a short post on runs that survive crashes.",
        "email_sender": "announcement sent to 1,024 subscribers",
        "seo_optimizer": "durable, workflows, postgres, agents",
        "formatter": lambda req: f"<article>{req.prompt.removeprefix('Format: ')}</article>",
    },
    delay={"content_writer": 0.2, "email_sender": 0.6, "seo_optimizer": 0.3, "formatter": 0.2},
)
model, model_line = default_model(fake)


def publish_to_cms(state: dict[str, Any]) -> dict[str, Any]:
    slug = zlib.crc32(state["html"].encode()) % 10_000
    return {"url": f"https://blog.example/posts/{slug}"}


writer = Agent("content_writer").instruct("Write a blog post about {topic}.").writes("draft")
email = Agent("email_sender").instruct("Announce: {draft}").writes("email_status")
seo = Agent("seo_optimizer").instruct("Keywords for: {draft}").writes("seo")
formatter = Agent("formatter").instruct("Format: {draft}").writes("html")

pipeline = (writer
            >> dispatch(email, seo, names=["email", "seo"])   # background, the run goes on
            >> formatter
            >> join("seo", timeout=30)                         # needs the keywords now
            >> fn(publish_to_cms)
            >> join("email"))                                  # the announcement may finish last

# Named outright, so the repo's dbos-config.yaml (the service's, for `dbos start`) is not consulted.
database_url = os.environ.get("DURAPIPE_DATABASE_URL") or "sqlite:///blog_demo.sqlite"
app = App("blog-demo", database_url, model=model)
publish = app.pipeline("publish", pipeline, inputs=["topic"])

if __name__ == "__main__":
    print(f"durapipe demo: {model_line}")
    print(f"recording runs in {app.database_url}")
    with app:
        started = time.perf_counter()
        run_id = f"demo-{int(time.time())}"
        result = publish.run({"topic": "durable AI pipelines"}, run_id=run_id)
        elapsed = (time.perf_counter() - started) * 1000
        print(f"run {result.run_id}: {result.status.value} in {elapsed:.0f} ms "
              "(writer, then formatter while email and seo run in the background)")
        for key in ("draft", "seo", "html", "url", "email_status"):
            print(f"  {key:13} {result.state[key]}")
        again = publish.start({"topic": "ignored"}, run_id=run_id).result()
        print(f"starting {run_id} again returns the recorded run: {again.state == result.state}")
    print(f"inspect it: .venv/bin/durapipe show {run_id} --database-url {app.database_url}")
