"""Builder and IR: operators, shapes, hashes and build-time checks."""

from __future__ import annotations

from typing import Any

import pytest

import durapipe
from durapipe import Agent, App, BuildError, fn, transform
from durapipe.ir import Fn, Parallel, Seq


def load(state: dict[str, Any]) -> dict[str, Any]:
    return {"rows": [1, 2]}


def save(state: dict[str, Any]) -> None:
    return None


def test_public_api_is_complete() -> None:
    for name in durapipe.__all__:
        assert hasattr(durapipe, name), name
    exported = {n for n in dir(durapipe) if not n.startswith("_")}
    modules = {"bestof", "builder", "engine", "errors", "ir", "manifest", "models", "planner", "retry", "state",
               "validate"}
    modules |= {"audit", "cli", "diagram", "diagram_svg", "fastapi", "runview", "web"}  # operator modules, imported by their tests
    assert exported - modules <= set(durapipe.__all__)


def test_operators_build_flat_trees_and_never_mutate() -> None:
    a, b, c = fn(load), fn(save), Agent("w")
    seq = a >> b >> c
    assert isinstance(seq, Seq) and seq.nodes == (a, b, c)
    par = a | b | c
    assert isinstance(par, Parallel) and par.branches == (a, b, c)
    bare = load >> b
    assert isinstance(bare.nodes[0], Fn) and bare.nodes[0].func is load
    w2 = c.instruct("x").writes("k")
    assert c.instruction is None and c.output_key is None
    assert (w2.instruction, w2.key) == ("x", "k")


def test_paths_are_positional() -> None:
    p = fn(load) >> (Agent("a") | Agent("b")) >> fn(save)
    paths = {path: node.label for path, node in p.walk()}
    assert paths == {"0": "seq", "0.0": "load", "0.1": "parallel", "0.1.0": "a",
                     "0.1.1": "b", "0.2": "save"}


def test_shape_is_json_and_hash_is_stable() -> None:
    def make() -> Any:
        return Agent("w", "gemini-2.5-flash").instruct("About {topic}").writes("d") >> fn(load, retries=2)

    assert make() == make()
    assert make().digest() == make().digest()
    shape = make().shape()
    assert shape["kind"] == "seq"
    assert shape["nodes"][1]["func"] == "load" and shape["nodes"][1]["max_retries"] == 2
    changed = Agent("w", "gemini-2.5-flash").instruct("About {topic}!").writes("d") >> fn(load, retries=2)
    assert changed.digest() != make().digest()


def test_not_a_node_is_a_build_error() -> None:
    with pytest.raises(BuildError, match="right side of >>.*is not a node"):
        fn(load) >> 3  # type: ignore[operator]
    with pytest.raises(BuildError, match="is not a node"):
        App("build-app").pipeline("p", "oops")


def test_missing_template_key_names_node_and_key() -> None:
    app = App("build-app")
    p = Agent("writer").instruct("Write about {topic}") >> Agent("seo").instruct("Keywords: {draftt}")
    with pytest.raises(BuildError, match=r"0\.1:seo reads state key 'draftt'") as e:
        app.pipeline("p", p, inputs=["topic"])
    assert e.value.key == "draftt" and e.value.path == "0.1"
    ok = Agent("writer").instruct("{topic}").writes("draft") >> Agent("seo").instruct("{draft}")
    app.pipeline("ok", ok, inputs=["topic"])


def test_declared_fn_reads_are_checked() -> None:
    app = App("build-app")
    p = fn(load, writes=["rows"]) >> fn(save, reads=["rows", "nope"])
    with pytest.raises(BuildError, match="'nope'"):
        app.pipeline("p", p, inputs=[])


def test_parallel_branches_writing_one_key_is_a_build_error() -> None:
    app = App("build-app")
    p = Agent("a").writes("out") | Agent("b").writes("out")
    with pytest.raises(BuildError, match=r"0\.0:a and 0\.1:b both write state key 'out'"):
        app.pipeline("p", p)
    q = fn(load, writes=["x"]) | fn(save, writes=["x"])
    with pytest.raises(BuildError, match="'x'"):
        app.pipeline("q", q)


def test_inputs_are_inferred_when_not_declared() -> None:
    app = App("build-app")
    p = app.pipeline("p", Agent("w").instruct("{topic} {tone}").writes("d") >> Agent("s").instruct("{d}"))
    assert p._reg.inputs == {"topic", "tone"}


def test_bad_builder_arguments() -> None:
    with pytest.raises(BuildError):
        Agent("")
    with pytest.raises(BuildError):
        Agent("a").retries(-1)
    with pytest.raises(BuildError):
        fn(load, retries=-2)
    with pytest.raises(BuildError):
        transform(42)  # type: ignore[arg-type]
    with pytest.raises(BuildError, match="placeholders"):
        Agent("a").instruct("{}")
