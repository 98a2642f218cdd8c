"""A pipeline that waits for legal approval (imported only where the gate feature exists)."""

from __future__ import annotations

from typing import Any

from durapipe import App, fn, gate

app = App("ops-gates")


def publish(state: dict[str, Any]) -> dict[str, Any]:
    return {"published": True}


review = app.pipeline("review", gate("legal", "Publish {title}?", approvers=["alice"]) >> fn(publish))
