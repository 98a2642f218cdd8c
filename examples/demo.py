"""The first-run demo: a blog pipeline on the embedded SQLite default, fully offline.

Run it with `make demo`. Set DURAPIPE_DATABASE_URL=postgresql://... to record on Postgres.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any

from durapipe import Agent, App, FakeModel, fn, transform

model = FakeModel(
    {
        "content_writer": lambda req: f"Why {req.prompt.split('about ')[-1].rstrip('.')} matters: a short post.",
        "seo_optimizer": "durable, workflows, postgres",
        "summarizer": "A post on why it matters.",
        "formatter": lambda req: f"<article>{req.prompt.removeprefix('Format: ')}</article>",
    },
    delay=0.05,
)

published: list[str] = []


def publish_to_cms(state: dict[str, Any]) -> dict[str, Any]:
    published.append(state["html"])
    return {"url": f"https://blog.example/posts/{zlib.crc32(state['html'].encode()) % 10_000}"}


writer = Agent("content_writer").instruct("Write a blog post about {topic}.").writes("draft")
seo = Agent("seo_optimizer").instruct("Keywords for: {draft}").writes("keywords")
summary = Agent("summarizer").instruct("Summarize: {draft}").writes("summary")
formatter = Agent("formatter").instruct("Format: {draft}").writes("html")
word_count = transform(lambda s: {"words": len(s["draft"].split())}, name="word_count")

app = App("blog-demo", model=model)
publish = app.pipeline(
    "publish",
    writer >> word_count >> (seo | summary) >> formatter >> fn(publish_to_cms),
    inputs=["topic"],
)

if __name__ == "__main__":
    print(f"durapipe demo: recording runs in {app.database_url}")
    with app:
        started = time.perf_counter()
        result = publish.run({"topic": "durable AI pipelines"}, run_id=f"demo-{int(time.time())}")
        elapsed = (time.perf_counter() - started) * 1000
        print(f"run {result.run_id}: {result.status.value} in {elapsed:.0f} ms")
        for key in ("draft", "words", "keywords", "summary", "url"):
            print(f"  {key:9} {result.state[key]}")
        again = publish.start({"topic": "ignored"}, run_id=result.run_id).result()
        print(f"starting {result.run_id} again returns the recorded run: {again.state == result.state}")
    if not os.environ.get("DURAPIPE_DATABASE_URL"):
        print("audit it: sqlite3 blog_demo.sqlite \"select workflow_uuid, function_name from operation_outputs\"")
