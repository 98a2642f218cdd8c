"""The blog publishing example runs its four dispatch/join patterns end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLE = Path(__file__).parents[1] / "examples" / "blog_publishing.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("blog_publishing_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_blog_publishing_patterns(database_url: str) -> None:
    blog = load_example()
    results = blog.main(database_url)
    seo, email = "keywords: durable, agents, postgres", "email sent to 1,024 subscribers"
    html = "<article>A post about durable AI agents</article>"
    for name in ("fire_and_join", "named_joins"):
        state = results[name]
        assert state["published"]["html"] == html and state["published"]["seo"] == seo
        assert state["email_status"] == email
    assert results["callbacks"]["email_status"] == email
    assert blog.NOTIFICATIONS == ["email_sender done: ['email_status']"]
    # The fn published {"words_scanned": i, ...}; the agent after it streams its text, so the
    # latest progress value at the end is the agent's whole answer.
    assert results["progress"]["seo_progress_at_end"] == seo
    assert results["progress"]["seo"] == seo and results["progress"]["outline"] == "agents"
