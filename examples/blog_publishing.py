"""Blog publishing with fire-and-continue background work: the four dispatch/join patterns.

Runs offline with fake models (the email agent takes 1 s, the SEO agent 0.5 s) on
``DURAPIPE_DATABASE_URL`` or an embedded SQLite file::

    python examples/blog_publishing.py
"""

from __future__ import annotations

import sys
import time
from typing import Any

from durapipe import Agent, App, FakeModel, Pipeline, dispatch, fn, join, progress

MODEL = FakeModel(
    {
        "content_writer": lambda req: f"A post about {req.prompt.split('about ')[-1]}",
        "email_sender": "email sent to 1,024 subscribers",
        "seo_optimizer": "keywords: durable, agents, postgres",
        "formatter": lambda req: f"<article>{req.prompt.removeprefix('Format: ')}</article>",
    },
    delay={"email_sender": 1.0, "seo_optimizer": 0.5},
)

writer = Agent("content_writer").instruct("Write a blog post about {topic}").writes("draft")
email_sender = Agent("email_sender").instruct("Announce: {draft}").writes("email_status")
seo_optimizer = Agent("seo_optimizer").instruct("Keywords for: {draft}").writes("seo")
formatter = Agent("formatter").instruct("Format: {draft}").writes("html")

# Callbacks run once per finished task, inside the task (never blocking the pipeline).
NOTIFICATIONS: list[str] = []


def notify_done(name: str, result: dict[str, Any]) -> None:
    NOTIFICATIONS.append(f"{name} done: {sorted(result)}")


def notify_failed(name: str, exc: BaseException) -> None:
    NOTIFICATIONS.append(f"{name} failed: {exc}")


def publish_to_cms(state: dict[str, Any]) -> dict[str, Any]:
    return {"published": {"html": state["html"], "seo": state.get("seo"),
                          "at_ms": int(time.time() * 1000)}}


def outline_keywords(state: dict[str, Any]) -> dict[str, Any]:
    """Publishes how far it got; the seo agent after it then streams its text as progress."""
    words = state["draft"].split()
    for i in range(1, len(words) + 1):
        progress({"words_scanned": i, "of": len(words)})
    return {"outline": words[-1]}


def record_progress(state: dict[str, Any]) -> dict[str, Any]:
    return {"seo_progress_at_end": state["seo_progress"]}


publisher = fn(publish_to_cms, reads=["html"], writes=["published"])

PATTERNS = {
    "fire_and_join": writer >> dispatch(email_sender, seo_optimizer) >> formatter >> join()
    >> publisher,
    "named_joins": writer >> dispatch(email_sender, seo_optimizer, names=["email", "seo"])
    >> formatter >> join("seo", timeout=30) >> publisher >> join("email"),
    "callbacks": writer >> dispatch(email_sender, on_complete=notify_done, on_error=notify_failed)
    >> formatter >> join(),
    "progress": writer
    >> dispatch(fn(outline_keywords, writes=["outline"]) >> seo_optimizer, names=["seo"],
                progress_key="seo_progress")
    >> formatter >> join() >> fn(record_progress, writes=["seo_progress_at_end"]),
}


def build(database_url: str | None = None) -> tuple[App, dict[str, Pipeline]]:
    """The app and its four registered pipelines."""
    app = App("blog", database_url, model=MODEL)
    return app, {name: app.pipeline(name, node) for name, node in PATTERNS.items()}


def main(database_url: str | None = None) -> dict[str, dict[str, Any]]:
    app, pipelines = build(database_url)
    results: dict[str, dict[str, Any]] = {}
    with app:
        for name, pipeline in pipelines.items():
            started = time.perf_counter()
            result = pipeline.run({"topic": "durable AI agents"})
            took = time.perf_counter() - started
            results[name] = result.state
            print(f"== {name} ({took:.2f} s, run {result.run_id})")
            for key, value in sorted(result.state.items()):
                print(f"   {key}: {value}")
    print("== callbacks:", NOTIFICATIONS)
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
