"""Build-time checks over the IR: reads, writes and names, each error naming a node path.

The analysis follows state through the tree: a key is *available* once a node upstream
writes it or it is a pipeline input. Functions that do not declare ``writes`` make the
rest of the flow *opaque* (anything may be there), so reads after them are checked at run
time instead, where a missing key is still a clear error naming the node and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .bestof import BestOf
from .errors import BuildError, PlanError, storable_text
from .ir import Agent, Dispatch, Fn, Gate, Join, Loop, MapOver, Node, Parallel, Seq, Transform
from .planner import Flow, Plan, PlannedStep, Step, at_path


@dataclass(frozen=True)
class Avail:
    keys: frozenset[str] = frozenset()
    opaque: bool = False
    # dispatched task name -> (keys it writes, whether it may write more)
    pending: tuple[tuple[str, frozenset[str], bool], ...] = ()

    def add(self, keys: tuple[str, ...] | frozenset[str] | None) -> Avail:
        if keys is None:
            return replace(self, opaque=True)
        return replace(self, keys=self.keys | frozenset(keys))


@dataclass
class Checker:
    inputs: frozenset[str] | None
    required: set[str] = field(default_factory=set)
    detached: set[str] = field(default_factory=set)
    joined: set[str] = field(default_factory=set)

    def need(self, path: str, node: Node, keys: tuple[str, ...], avail: Avail) -> None:
        if avail.opaque:
            return
        for k in keys:
            if k in avail.keys:
                continue
            if self.inputs is None:
                self.required.add(k)
                continue
            raise BuildError(
                f"node {path}:{node.label} reads state key {k!r}, which nothing upstream writes "
                f"and which is not a pipeline input {sorted(self.inputs)}; add it to "
                "inputs=[...] or write it in an earlier node",
                path=path, node=node.label, key=k,
            )

    def flow(self, node: Node, path: str, avail: Avail) -> Avail:
        if isinstance(node, Agent):
            self.need(path, node, node.reads(), avail)
            return avail.add((node.key,))
        if isinstance(node, (Fn, Transform)):
            if node.reads is not None:
                self.need(path, node, node.reads, avail)
            return avail.add(node.writes)
        if isinstance(node, Seq):
            for i, child in enumerate(node.nodes):
                avail = self.flow(child, f"{path}.{i}", avail)
            return avail
        if isinstance(node, Parallel):
            return self.parallel(node, path, avail)
        if isinstance(node, MapOver):
            self.need(path, node, (node.items_key,), avail)
            self.flow(node.body, f"{path}.0", avail.add((node.item_key,)))
            out = avail.add((node.output_key,))
            return out.add((node.failures_key,)) if node.errors == "collect" else out
        if isinstance(node, BestOf):
            after = self.flow(node.body, f"{path}.0", avail.add((node.item_key,)))
            return replace(after, keys=after.keys - ({node.item_key} - avail.keys))
        if isinstance(node, Loop):
            self.no_flow_in_loop(node, path)
        if isinstance(node, Gate):
            return avail.add((node.name,))
        if isinstance(node, Dispatch):
            return self.dispatch(node, path, avail)
        if isinstance(node, Join):
            return self.join(node, path, avail)
        if isinstance(node, Flow):
            return self.goal_flow(node, path, avail)
        if isinstance(node, Step):
            self.need(path, node, node.needs, avail)
            self.flow(node.node, f"{path}.0", avail.add(node.needs))
            return avail.add(node.outputs)
        # Every other composite: each child starts from the same state; what any writes
        # may be there afterwards.
        out = avail
        for i, child in enumerate(node.children()):
            after = self.flow(child, f"{path}.{i}", avail)
            out = replace(out, keys=out.keys | after.keys, opaque=out.opaque or after.opaque,
                          pending=after.pending if len(after.pending) > len(out.pending) else out.pending)
        return out

    def parallel(self, node: Parallel, path: str, avail: Avail) -> Avail:
        writers: dict[str, str] = {}
        out = avail
        for i, branch in enumerate(node.branches):
            bpath = f"{path}.{i}"
            after = self.flow(branch, bpath, avail)
            for k in sorted(after.keys - avail.keys):
                if k in writers:
                    raise BuildError(
                        f"parallel node {path}: branches {writers[k]} and {bpath}:{branch.label} "
                        f"both write state key {k!r}; give each branch its own key",
                        path=path, key=k,
                    )
                writers[k] = f"{bpath}:{branch.label}"
            # Tasks a branch dispatched are pending afterwards; those it joined are not.
            started = tuple(p for p in after.pending if p not in avail.pending)
            out = replace(out, keys=out.keys | after.keys, opaque=out.opaque or after.opaque,
                          pending=tuple(p for p in out.pending if p in after.pending
                                        or p not in avail.pending) + started)
        return out.add((node.errors_key or "errors",)) if node.errors == "collect" else out

    def no_flow_in_loop(self, node: Loop, path: str) -> None:
        for sub, n in node.body.walk(f"{path}.0"):
            if isinstance(n, Flow):
                raise BuildError(
                    f"loop {path}: the goal-driven Flow at {sub} cannot repeat: a Flow plans from "
                    "what state already holds, so from pass 2 on its goals are there and it would "
                    "run nothing; loop the nodes its steps run (fn/agents) instead, or write the "
                    "goals under new keys in each pass", path=path, node=sub,
                )

    def dispatch(self, node: Dispatch, path: str, avail: Avail) -> Avail:
        known = {name for name, _, _ in avail.pending} | self.detached
        pending = list(avail.pending)
        for i, (name, task) in enumerate(zip(node.names, node.tasks, strict=True)):
            if node.detach:
                if name in known:
                    raise BuildError(
                        f"dispatch {path}: task name {name!r} is already used by an earlier "
                        "dispatch; give it another name with names=[...]", path=path, name=name)
                self.detached.add(name)
                self.flow(task, f"{path}.{i}", avail)
                continue
            if name in known:
                raise BuildError(
                    f"dispatch {path}: task name {name!r} is already used by an earlier dispatch; "
                    "give it another name with names=[...]",
                    path=path, name=name,
                )
            known.add(name)
            after = self.flow(task, f"{path}.{i}", avail)
            pending.append((name, after.keys - avail.keys, after.opaque))
        out = replace(avail, pending=tuple(pending))
        # The latest progress value (None until a task publishes one) is in state at once.
        return out.add((node.progress_key,)) if node.progress_key else out

    def join(self, node: Join, path: str, avail: Avail) -> Avail:
        names = {name for name, _, _ in avail.pending}
        if not node.names and not names:
            raise BuildError(
                f"join {path}: there is nothing to join here; no dispatch upstream starts a "
                "background task that is not joined yet (detached tasks are never joined). "
                "Remove the join, or dispatch(...) before it", path=path,
            )
        for name in node.names:
            if name in self.detached and name not in names:
                raise BuildError(
                    f"join {path}: task {name!r} is dispatched with detach=True, so it is never "
                    "joined; drop detach=True to join it, or drop it from the join",
                    path=path, name=name,
                )
            if name not in names and name in self.joined:
                raise BuildError(
                    f"join {path}: task {name!r} is joined already by a join upstream, so "
                    "this one would wait for nothing; remove it from this join",
                    path=path, name=name,
                )
            if name not in names:
                raise BuildError(
                    f"join {path}: no dispatch upstream starts a task named {name!r} "
                    f"(dispatched: {sorted(names)})",
                    path=path, name=name,
                )
        for name, keys, opaque in avail.pending:
            if not node.names or name in node.names:
                avail = avail.add(None) if opaque else avail.add(keys)
                self.joined.add(name)
        # What this join collects is no longer pending: a later join() has nothing of it.
        return replace(avail, pending=tuple(p for p in avail.pending
                                            if node.names and p[0] not in node.names))


    def goal_flow(self, node: Flow, path: str, avail: Avail) -> Avail:
        """Plan the flow from what upstream provides; its reads and writes come from the plan."""
        if avail.opaque:
            # Upstream may write anything: the flow is planned at run time from the state.
            return avail
        inputs = avail.keys
        if self.inputs is None:
            # Inputs are inferred: a need no step produces becomes a pipeline input.
            produced = {k for s in node.steps for k in s.outputs}
            inputs |= {k for s in node.steps for k in s.needs if k not in produced}
        try:
            plan = node.plan(inputs=inputs)
        except PlanError as exc:
            raise at_path(exc, path) from None
        self.required |= plan.reads - avail.keys
        for planned in plan.steps:
            ready = set(planned.needs) | _upstream_outputs(planned, plan)
            self.flow(node.steps[planned.index].node, f"{path}.{planned.index}.0",
                      avail.add(frozenset(ready)))
        return avail.add(plan.writes)


def _upstream_outputs(planned: PlannedStep, plan: Plan) -> set[str]:
    """Every key written by the steps a planned step transitively waits for."""
    out: set[str] = set()
    seen: set[str] = set()
    todo = list(planned.after)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        dep = plan.step(name)
        out |= set(dep.outputs)
        todo.extend(dep.after)
    return out


def check_texts(node: Node) -> None:
    """Refuse names, messages and keys the database cannot store (NUL, lone surrogates):
    they end up in step names, events and state."""
    for path, n in node.walk():
        for f in fields(n):
            value = getattr(n, f.name)
            for text in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(text, str) and storable_text(text) != text:
                    raise BuildError(
                        f"node {path}:{storable_text(n.label)}: {f.name} {storable_text(text)!r} "
                        "contains a NUL character or a lone surrogate, which the database cannot "
                        "store; remove it", path=path)


def check(node: Node, inputs: list[str] | tuple[str, ...] | None = None) -> frozenset[str]:
    """Check a pipeline; return the input keys it needs (declared, or inferred when not)."""
    check_texts(node)
    checker = Checker(frozenset(inputs) if inputs is not None else None)
    checker.flow(node, "0", Avail(keys=checker.inputs or frozenset()))
    return checker.inputs if checker.inputs is not None else frozenset(checker.required)
