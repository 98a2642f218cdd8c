"""The App launched in this process, for the code DBOS calls back into.

DBOS is a process singleton, so there is at most one launched App; the workflows look
their pipeline up in it, and steps and child waits ask it for its step writer. The App
binds itself here at launch and unbinds at shutdown; nothing here imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DurapipeError

if TYPE_CHECKING:
    from .app import App
    from .steps import StepLog

_current: dict[str, App] = {}


def set_current_app(app: App | None) -> None:
    """Bind the launched App (DBOS is a process singleton, so there is at most one)."""
    _current.clear()
    if app is not None:
        _current["app"] = app


def current_app() -> App:
    app = _current.get("app")
    if app is None:
        raise DurapipeError("no durapipe App is launched in this process; use `with app:`")
    return app


def active_step_log() -> StepLog | None:
    """The launched app's step writer, or None when steps go through ``DBOS.run_step``."""
    app = _current.get("app")
    return app.step_log() if app is not None else None
