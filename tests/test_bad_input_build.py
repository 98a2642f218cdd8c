"""Bad input to the builder: random nesting of valid nodes and junk anywhere an operator or
builder takes a value. Only DurapipeError subclasses with a message come out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from durapipe import Agent, App, BuildError, DurapipeError, fn, transform
from durapipe.errors import AppStateError
from durapipe.ir import Node


def good(state: dict[str, Any]) -> dict[str, Any]:
    return {"out": 1}


class Thing:
    pass


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.binary(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(int), st.just(Thing), st.just(Thing()), st.just(object()), st.just(b"\x00"),
)
LEAVES = st.one_of(
    st.builds(lambda k: Agent("a").instruct(f"x {{{k}}}").writes("w" + k),
              st.sampled_from(["topic", "x", "q"])),
    st.just(fn(good)),
    st.just(transform(lambda s: None, name="t")),
    st.just(good),
)


def combine(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.tuples(st.sampled_from([">>", "|", "<<"]), children, children)


NODES = st.recursive(st.one_of(LEAVES, JUNK), combine, max_leaves=8)


def build(tree: Any) -> Any:
    if not isinstance(tree, tuple) or len(tree) != 3 or tree[0] not in (">>", "|", "<<"):
        return tree
    op, left, right = tree[0], build(tree[1]), build(tree[2])
    if not isinstance(left, Node) and not isinstance(right, Node):
        return left  # junk op junk is plain Python (2 >> 1), not durapipe's business
    if op == ">>":
        return left >> right
    if op == "|":
        return left | right
    return right >> left


def well_formed(err: BaseException) -> None:
    assert isinstance(err, DurapipeError), repr(err)
    assert isinstance(err.message, str) and len(err.message) > 10
    assert isinstance(err.data, dict)


@settings(max_examples=300, deadline=None)
@given(tree=NODES)
def test_random_pipelines_build_or_fail_with_a_build_error(tree: Any) -> None:
    app = App("bad-build", "sqlite:///unused.sqlite")
    try:
        node = build(tree)
        app.pipeline("p", node)
    except Exception as exc:
        well_formed(exc)
        assert isinstance(exc, BuildError), repr(exc)
        return
    assert isinstance(app.pipelines["p"].node, Node)


def is_function(x: Any) -> bool:
    return callable(x) and not isinstance(x, type)


def is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def is_name(x: Any) -> bool:
    return isinstance(x, str) and bool(x.strip())


def is_keys(x: Any) -> bool:
    if x is None or (isinstance(x, str) and x):
        return True
    return isinstance(x, (list, tuple, set, frozenset)) and all(isinstance(k, str) and k for k in x)


def is_app_name(x: Any) -> bool:
    """Any text of 3 to 256 characters: others than letters, digits, '-', '_' become '-'."""
    return isinstance(x, str) and 3 <= len(x.lower()) <= 256


# Each builder call with the junk in one argument, and what that argument takes.
CALLS: list[tuple[Callable[[Any], Any], Callable[[Any], bool]]] = [
    (lambda j: fn(j), is_function),
    (lambda j: fn(good, retries=j), lambda x: x is None or is_count(x)),
    (lambda j: fn(good, reads=j), is_keys),
    (lambda j: fn(good, writes=j), is_keys),
    (lambda j: transform(j), is_function),
    (lambda j: transform(good, reads=j), is_keys),
    (lambda j: Agent(j), is_name),
    (lambda j: Agent("a").instruct(j), lambda x: isinstance(x, str)),
    (lambda j: Agent("a").writes(j), lambda x: isinstance(x, str) and bool(x)),
    (lambda j: Agent("a").retries(j), is_count),
    (lambda j: Agent("a").tools(j), callable),
    (lambda j: App(j), is_app_name),
    (lambda j: App("bad-build", "sqlite:///unused.sqlite").pipeline(j, fn(good)), lambda x: isinstance(x, str) and bool(x)),
    (lambda j: App("bad-build", "sqlite:///unused.sqlite").pipeline("p", fn(good), inputs=j),
     lambda x: x is None or (isinstance(x, (list, tuple)) and all(isinstance(k, str) and k for k in x))),
]


@settings(max_examples=200, deadline=None)
@given(junk=JUNK, which=st.integers(min_value=0, max_value=len(CALLS) - 1))
@example(junk=True, which=1)
@example(junk=-1, which=9)
@example(junk="", which=6)
@example(junk=Thing, which=0)
@example(junk=["ok", 3], which=2)
@example(junk="ab", which=11)
def test_builder_arguments_of_the_wrong_type_are_build_errors(junk: Any, which: int) -> None:
    """A value the argument does not take raises BuildError (AppStateError for ``App``'s
    name); a call that returns took a value of the documented type."""
    call, takes = CALLS[which]
    try:
        call(junk)
    except Exception as exc:
        well_formed(exc)
        assert isinstance(exc, AppStateError if which == 11 else BuildError), repr(exc)
        return
    assert takes(junk), f"call {which} accepted {junk!r}"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30))
def test_any_instruction_text_is_accepted_or_a_build_error(text: str) -> None:
    try:
        agent = Agent("a").instruct(text)
    except Exception as exc:
        well_formed(exc)
        assert isinstance(exc, BuildError)
        return
    assert agent.instruction == text


def test_malformed_braces_name_the_agent_and_the_fix() -> None:
    for text in ["Hello {", "Hello }", "{a!z}", "{0}", "{}"]:
        try:
            Agent("writer").instruct(text)
        except BuildError as exc:
            assert "writer" in str(exc) and "{" in str(exc), exc
        else:
            raise AssertionError(f"{text!r} was accepted")
