"""The engine: the only part of durapipe that touches the DBOS singleton."""

from .app import App
from .runs import Pipeline, RunHandle, RunResult, RunStatus

__all__ = ["App", "Pipeline", "RunHandle", "RunResult", "RunStatus"]
