"""Goal-driven flows: steps declared by the keys they need and produce, planned from goals.

>>> onboarding = Flow(
...     goals=["onboarding_complete"],
...     steps=[
...         Step("setup-account", setup_account, needs=["email"], outputs=["account_id"]),
...         Step("complete", complete, needs=["account_id"], outputs=["onboarding_complete"]),
...     ],
... )
>>> print(onboarding.plan(inputs=["email"]))      # a table; .mermaid() for a graph

The planner starts from the goals and walks back through the steps that produce each
needed key, so only the steps the goals require are chosen. A key that is a flow input is
never produced again. Every mistake it can find is a :class:`PlanError` naming the steps
and keys involved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import BuildError, PlanError
from .ir import OPTION, RETRY_COUNT, Agent, Fn, Node, as_node
from .retry import Retry, as_retry


def _names(arg: Any, what: str, owner: str) -> tuple[str, ...]:
    if isinstance(arg, str):
        arg = [arg]
    try:
        keys = tuple(arg)
    except TypeError:
        raise BuildError(f"{owner}: {what} must be a list of strings, got {arg!r}") from None
    for k in keys:
        if not isinstance(k, str) or not k:
            raise BuildError(f"{owner}: {what} must be non-empty strings, got {k!r}")
    if len(set(keys)) != len(keys):
        raise BuildError(f"{owner}: {what} {list(keys)} lists a key twice")
    return keys


@dataclass(frozen=True, init=False)
class Step(Node):
    """One step of a :class:`Flow`: a node plus the state keys it needs and produces.

    ``fn`` is any node (``fn(...)``, an ``Agent``, a sub-pipeline) or a bare function of
    the state. The step must write every key in ``outputs``; ``retry=Retry(...)`` re-runs
    it when it fails, with a durable count and backoff (see :class:`durapipe.Retry`), and
    ``retries=n`` is short for ``retry=Retry(attempts=n + 1, backoff=0.5)``. A function or
    agent without a policy of its own takes the step's.

    >>> Step("setup-account", setup_account, needs=["customer_id", "email"], outputs=["account_id"])
    """

    kind: ClassVar[str] = "step"
    name: str
    node: Node
    needs: tuple[str, ...]
    outputs: tuple[str, ...]
    retries: int = field(metadata=RETRY_COUNT)
    retry: Retry | None = field(default=None, metadata=OPTION)

    def __init__(self, name: str, fn: Any, needs: Iterable[str] = (), outputs: Iterable[str] = (),
                 retries: int | None = None, retry: Retry | None = None) -> None:
        if not isinstance(name, str) or not name.strip():
            raise BuildError(f"Step({name!r}): the name must be a non-empty string")
        owner = f"step {name!r}"
        node = as_node(fn, owner)
        outs = _names(outputs, "outputs", owner)
        if not outs:
            raise BuildError(f"{owner}: declare what it produces with outputs=[...]", step=name)
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                    or retries < 0):
            raise BuildError(f"{owner}: retries must be an int >= 0, got {retries!r}", step=name)
        n = retries or 0
        # Leaves retry inside their one DBOS step; composites are re-run by the step handler.
        if isinstance(node, Fn) and n > node.max_retries:
            node = node._replace(max_retries=n)
        elif isinstance(node, Agent) and n > node.max_retries:
            node = node.retries(n)
        policy = as_retry(retry, owner)
        # A durable policy goes on a function or agent itself (unless it has its own); any
        # other node is re-run by the step handler, each attempt recorded.
        if policy is not None and isinstance(node, Fn) and node.retry is None:
            node = node._replace(retry=policy)
        elif policy is not None and isinstance(node, Agent) and node.retry_policy is None:
            node = node.retry(policy)
        object.__setattr__(self, "retry", policy)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "needs", _names(needs, "needs", owner))
        object.__setattr__(self, "outputs", outs)
        object.__setattr__(self, "retries", n)

    @property
    def label(self) -> str:
        return self.name

    def children(self) -> tuple[Node, ...]:
        return (self.node,)


@dataclass(frozen=True)
class PlannedStep:
    """A chosen step: where it sits in the flow, what it waits for, and its stage."""

    name: str
    index: int
    needs: tuple[str, ...]
    outputs: tuple[str, ...]
    after: tuple[str, ...]
    stage: int


@dataclass(frozen=True)
class Plan:
    """The steps a flow runs for given inputs, in a stable topological order.

    ``stages`` groups steps whose needs are met at the same depth; at run time a step does
    not wait for its whole stage, only for the steps in its ``after``.
    """

    goals: tuple[str, ...]
    inputs: frozenset[str]
    steps: tuple[PlannedStep, ...]
    skipped: tuple[str, ...]

    @property
    def stages(self) -> tuple[tuple[str, ...], ...]:
        depth = max((s.stage for s in self.steps), default=-1) + 1
        return tuple(tuple(s.name for s in self.steps if s.stage == d) for d in range(depth))

    @property
    def reads(self) -> frozenset[str]:
        """The flow inputs the chosen steps need."""
        return frozenset(k for s in self.steps for k in s.needs if k in self.inputs)

    @property
    def writes(self) -> frozenset[str]:
        """The keys the chosen steps produce."""
        return frozenset(k for s in self.steps for k in s.outputs)

    def step(self, name: str) -> PlannedStep:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def __str__(self) -> str:
        header = ("stage", "step", "needs", "outputs", "after")
        rows = [(str(s.stage), s.name, ", ".join(s.needs) or "-", ", ".join(s.outputs),
                 ", ".join(s.after) or "inputs") for s in self.steps]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(r: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

        out = [line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]
        out.append(f"goals: {', '.join(self.goals)}")
        out.append(f"inputs: {', '.join(sorted(self.reads)) or '-'}")
        if self.skipped:
            out.append(f"not needed: {', '.join(self.skipped)}")
        return "\n".join(out)

    def mermaid(self) -> str:
        """The plan as a Mermaid flowchart: inputs, steps, and edges labelled with keys."""
        ids = {s.name: f"s{s.index}" for s in self.steps}
        out = ["flowchart LR"]
        for key in sorted(self.reads):
            out.append(f'    in_{_mid(key)}(["{key}"])')
        for s in self.steps:
            out.append(f'    {ids[s.name]}["{s.name}"]')
        by_output = {k: s.name for s in self.steps for k in s.outputs}
        for s in self.steps:
            for k in s.needs:
                src = f"in_{_mid(k)}" if k in self.inputs else ids[by_output[k]]
                out.append(f"    {src} -- {k} --> {ids[s.name]}")
        goal_ids = [ids[s.name] for s in self.steps
                    if s.name in self.goals or set(s.outputs) & set(self.goals)]
        if goal_ids:
            out.append("    classDef goal stroke-width:3px")
            out.append(f"    class {','.join(goal_ids)} goal")
        return "\n".join(out)


def at_path(exc: PlanError, path: str) -> PlanError:
    """The same PlanError, naming the flow by its node path."""
    message = exc.message.removeprefix("Flow: ")
    return PlanError(f"flow {path}: {message}", **{**exc.data, "path": path})


def _mid(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)


@dataclass(frozen=True, init=False)
class Flow(Node):
    """A goal-driven node: runs only the steps its goals need, each as soon as it can.

    ``goals`` name output keys or step names. Children are all steps in declaration order,
    so node paths do not depend on which steps a run chooses.

    >>> flow = Flow(goals=["report"], steps=[Step("fetch", fetch, needs=["url"], outputs=["page"]),
    ...                                      Step("report", summarize, needs=["page"], outputs=["report"])])
    >>> flow.plan(inputs=["url"]).stages
    (('fetch',), ('report',))
    """

    kind: ClassVar[str] = "flow"
    goals: tuple[str, ...]
    steps: tuple[Step, ...]

    def __init__(self, goals: Iterable[str], steps: Iterable[Step]) -> None:
        goal_list = _names(goals, "goals", "Flow")
        if not goal_list:
            raise PlanError("Flow: give at least one goal (an output key or a step name)")
        step_list = tuple(steps)
        if not step_list:
            raise PlanError("Flow: give at least one Step")
        names: set[str] = set()
        producers: dict[str, str] = {}
        for s in step_list:
            if not isinstance(s, Step):
                raise BuildError(f"Flow: {s!r} is not a Step; wrap it as Step(name, fn, needs=..., outputs=...)")
            if s.name in names:
                raise PlanError(f"Flow: two steps are named {s.name!r}; step names must be unique",
                                step=s.name)
            names.add(s.name)
            for k in s.outputs:
                if k in producers:
                    raise PlanError(
                        f"Flow: steps {producers[k]!r} and {s.name!r} both produce {k!r}; "
                        "one key has one producer, so rename one of the outputs",
                        steps=[producers[k], s.name], key=k,
                    )
                producers[k] = s.name
        for g in goal_list:
            if g not in names and g not in producers:
                raise PlanError(
                    f"Flow: unknown goal {g!r}: no step is named so or produces it "
                    f"(steps: {sorted(names)}; outputs: {sorted(producers)})",
                    goal=g,
                )
        object.__setattr__(self, "goals", goal_list)
        object.__setattr__(self, "steps", step_list)

    def children(self) -> tuple[Node, ...]:
        return self.steps

    def producer(self, key: str) -> int | None:
        """Index of the step producing ``key``, if any."""
        for i, s in enumerate(self.steps):
            if key in s.outputs:
                return i
        return None

    def plan(self, inputs: Iterable[str] = ()) -> Plan:
        """Choose the smallest set of steps that reach the goals from ``inputs``."""
        given = frozenset(inputs)
        index = {s.name: i for i, s in enumerate(self.steps)}
        chosen: dict[int, tuple[int, ...]] = {}  # step index -> indices of the steps it waits for
        visiting: list[int] = []

        def visit(i: int) -> None:
            if i in chosen:
                return
            if i in visiting:
                cycle = visiting[visiting.index(i):] + [i]
                names = [self.steps[j].name for j in cycle]
                edges = _cycle_links(self.steps, cycle, given)
                links = [f"{self.steps[a].name} needs {key!r} from {self.steps[b].name}"
                         for a, b, key in edges]
                raise PlanError(
                    f"Flow: steps form a cycle {' -> '.join(names)} ({'; '.join(links)}); "
                    "break it by making one of these keys a flow input or removing a need",
                    steps=names, keys=[key for _, _, key in edges],
                )
            visiting.append(i)
            step = self.steps[i]
            deps: list[int] = []
            for k in step.needs:
                if k in given:
                    continue
                j = self.producer(k)
                if j is None:
                    raise PlanError(
                        f"Flow: step {step.name!r} needs {k!r}, which no step produces and which "
                        f"is not a flow input (inputs: {sorted(given)}); pass it as an input or "
                        "add a step with it in outputs=[...]",
                        step=step.name, key=k,
                    )
                visit(j)
                if j not in deps:
                    deps.append(j)
            visiting.pop()
            chosen[i] = tuple(deps)

        for g in self.goals:
            if g in index:
                visit(index[g])
            elif g not in given:
                j = self.producer(g)
                assert j is not None  # unknown goals are refused at construction
                visit(j)

        stage: dict[int, int] = {}
        for i in chosen:  # insertion order is post-order: dependencies come first
            stage[i] = max((stage[d] + 1 for d in chosen[i]), default=0)
        order = sorted(chosen, key=lambda i: (stage[i], i))
        planned = tuple(
            PlannedStep(self.steps[i].name, i, self.steps[i].needs, self.steps[i].outputs,
                        tuple(self.steps[d].name for d in sorted(chosen[i])), stage[i])
            for i in order
        )
        skipped = tuple(s.name for i, s in enumerate(self.steps) if i not in chosen)
        return Plan(self.goals, given, planned, skipped)


def _cycle_links(steps: tuple[Step, ...], cycle: list[int],
                 given: frozenset[str]) -> list[tuple[int, int, str]]:
    links = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        key = next(k for k in steps[a].needs if k in steps[b].outputs and k not in given)
        links.append((a, b, key))
    return links


__all__ = ["Flow", "Plan", "PlannedStep", "Step", "at_path"]
