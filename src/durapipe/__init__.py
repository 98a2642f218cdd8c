"""durapipe: compose LLM agents and functions into pipelines that run as durable DBOS workflows.

>>> from durapipe import App, Agent, fn
>>> from durapipe.models import FakeModel
>>> app = App("hello", model=FakeModel({"writer": "Hi!"}))
>>> greet = app.pipeline("greet", Agent("writer").instruct("Greet {name}.").writes("greeting"))
>>> with app:
...     greet.run({"name": "Ada"}).state["greeting"]
'Hi!'
"""

from .builder import fn, gate, map_over, race, route, sleep, transform, until
from .engine import App, Pipeline, RunHandle, RunResult, RunStatus
from .engine.gates import PendingGate
from .errors import (
    BuildError, DurapipeError, GateRejected, ModelError, NodeFailed, NodeTimeout, RunCancelled,
    RunError, StateError,
)
from .ir import Agent, Node
from .models import FakeModel

__all__ = [
    "Agent", "App", "BuildError", "DurapipeError", "FakeModel", "GateRejected", "ModelError",
    "Node", "NodeFailed", "NodeTimeout", "Pipeline", "RunCancelled", "RunError", "RunHandle",
    "RunResult", "RunStatus", "StateError", "fn", "transform",
    "PendingGate", "gate", "map_over", "race", "route", "sleep", "until",
]
