"""durapipe: compose LLM agents and functions into pipelines that run as durable DBOS workflows.

>>> from durapipe import App, Agent, fn
>>> from durapipe.models import FakeModel
>>> app = App("hello", model=FakeModel({"writer": "Hi!"}))
>>> greet = app.pipeline("greet", Agent("writer").instruct("Greet {name}.").writes("greeting"))
>>> with app:
...     greet.run({"name": "Ada"}).state["greeting"]
'Hi!'
"""

from .bestof import best_of
from .builder import (
    dispatch,
    fn,
    gate,
    join,
    limit,
    map_over,
    parallel,
    patched,
    race,
    route,
    sleep,
    transform,
    until,
)
from .engine import App, Pipeline, RunHandle, RunResult, RunStatus
from .engine.dispatch import progress
from .engine.eventread import Event, EventType
from .engine.gates import PendingGate
from .errors import (
    BudgetExceeded,
    BuildError,
    DurapipeError,
    GateRejected,
    ModelError,
    NodeFailed,
    NodeTimeout,
    PlanError,
    RunCancelled,
    RunError,
    RunTimeout,
    StateError,
    UnknownGate,
    UnknownRun,
)
from .ir import Agent, Node
from .models import FakeModel
from .planner import Flow, Plan, Step
from .retry import Retry

__all__ = [
    "Agent", "App", "BudgetExceeded", "BuildError", "DurapipeError", "Event", "EventType", "FakeModel", "Flow",
    "GateRejected",
    "ModelError", "Node", "NodeFailed", "NodeTimeout", "PendingGate", "Pipeline", "Plan",
    "PlanError", "Retry", "RunCancelled", "RunError", "RunHandle", "RunResult", "RunStatus",
    "RunTimeout", "StateError", "Step", "UnknownGate", "UnknownRun", "best_of", "dispatch", "fn",
    "gate", "join", "limit", "map_over", "parallel", "patched", "progress", "race", "route", "sleep",
    "transform", "until",
]
