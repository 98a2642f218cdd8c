"""Pipeline identity and manifests, and what a deploy lets a run in flight do (no database)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from typing import Any

import pytest

from durapipe import Agent, BuildError, fn, gate, patched
from durapipe.ir import Node
from durapipe.manifest import Frontier, compare, manifest

SOURCE = textwrap.dedent('''
    from durapipe import Agent, fn, gate

    def enrich(state):
        return {"rich": True}

    def publish(state):
        return None

    pipeline = (fn(enrich) >> gate("legal", "ok?") >> fn(lambda s: None)
                >> Agent("writer").instruct("Write about {topic}.") >> fn(publish))
''')


def load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_identity_does_not_depend_on_how_the_module_was_imported(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "pkg").mkdir(parents=True)
    (tmp_path / "a" / "flows.py").write_text(SOURCE)
    (tmp_path / "b" / "pkg" / "flows.py").write_text(SOURCE)
    as_main = load(tmp_path / "a" / "flows.py", "__main__")
    as_module = load(tmp_path / "a" / "flows.py", "flows")
    elsewhere = load(tmp_path / "b" / "pkg" / "flows.py", "pkg.flows")
    digests = {m.pipeline.digest() for m in (as_main, as_module, elsewhere)}
    assert len(digests) == 1


def one(state: dict[str, Any]) -> None:
    return None


def two(state: dict[str, Any]) -> None:
    return None


def three(state: dict[str, Any]) -> None:
    return None


def added(state: dict[str, Any]) -> None:
    return None


def pipeline(prompt: str = "Write about {topic}.", extra: bool = False, first: Any = None) -> Node:
    nodes: Any = (first or fn(one)) >> fn(two) >> gate("legal", "Publish {topic}?")
    if extra:
        nodes = nodes >> fn(added)
    return nodes >> Agent("writer").instruct(prompt).writes("draft") >> fn(three)  # type: ignore[no-any-return]


def at(*paths: str, trailing: bool = False) -> Frontier:
    return Frontier(paths, trailing)


def test_manifest_lists_every_node_with_kind_name_reads_and_writes() -> None:
    entries = {e["path"]: e for e in manifest(pipeline())}
    assert [entries[p]["kind"] for p in ("0", "0.0", "0.2", "0.3")] == ["seq", "fn", "gate", "agent"]
    assert entries["0.3"]["name"] == "writer"
    assert entries["0.3"]["reads"] == ["topic"] and entries["0.3"]["writes"] == ["draft"]
    assert entries["0.2"]["reads"] == ["topic"]


def test_changes_after_the_frontier_are_compatible() -> None:
    old = manifest(pipeline())
    new = manifest(pipeline(prompt="Write a poem about {topic}.", extra=True))
    # parked at the gate: its step and its event/recv operations are recorded
    verdict = compare(old, new, at("0.0", "0.1", "0.2", trailing=True))
    assert verdict.compatible and verdict.frontier == "0.2"


def test_a_change_in_a_passed_node_is_not_compatible_and_names_the_node() -> None:
    old = manifest(pipeline())
    new = manifest(pipeline(first=fn(one, reads=["topic"])))
    verdict = compare(old, new, at("0.0", "0.1"))
    assert not verdict.compatible and verdict.node == "0.0"
    assert "already passed" in verdict.reason and "reads ['topic'] instead of None" in verdict.reason
    # a run that recorded nothing yet may run any code
    assert compare(old, new, at()).compatible


def test_unnamed_operations_after_the_frontier_cover_the_nodes_they_may_belong_to() -> None:
    def p(wait: Any) -> Node:
        return fn(one) >> wait >> fn(three)  # type: ignore[no-any-return]

    from durapipe import sleep

    old, new = manifest(p(sleep(5))), manifest(p(sleep(50)))
    assert compare(old, new, at("0.0")).compatible            # the sleep has not started
    verdict = compare(old, new, at("0.0", trailing=True))     # a DBOS.sleep row is recorded
    assert not verdict.compatible and verdict.node == "0.1"


def test_a_child_workflow_needs_its_whole_subtree_unchanged() -> None:
    old = manifest(fn(one) >> (fn(two) | fn(three)))
    same = manifest(fn(one) >> (fn(two) | fn(three)) >> fn(added))
    changed = manifest(fn(one) >> (fn(two) | fn(added)))
    assert compare(old, same, at(), path="0.1").compatible
    assert not compare(old, changed, at(), path="0.1").compatible


def test_patched_marker_is_part_of_the_shape() -> None:
    plain = fn(one) >> fn(three)
    marked = fn(one) >> patched("v2", new=fn(added), old=fn(three))
    entries = {e["path"]: e for e in manifest(marked)}
    assert entries["0.1"]["kind"] == "patched" and entries["0.1"]["name"] == "v2"
    assert plain.digest() != marked.digest()


def test_patched_needs_a_marker_name() -> None:
    with pytest.raises(BuildError, match="marker name must be a non-empty string"):
        patched("", new=fn(one), old=fn(two))


def test_check_compat_against_an_exported_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from durapipe.cli import cli

    script = str(Path(__file__).parent / "scripts" / "deploy_app.py")
    monkeypatch.setenv("DEPLOY_CODE", "v1")
    exported = CliRunner().invoke(cli, ["versions", "export", script])
    assert exported.exit_code == 0, exported.output
    deployed = tmp_path / "manifest.json"
    deployed.write_text(exported.stdout)

    def check(code: str, *extra: str) -> Any:
        monkeypatch.setenv("DEPLOY_CODE", code)
        return CliRunner().invoke(cli, ["check-compat", script, "--manifest", str(deployed), *extra])

    later = check("v2-later", "--json")
    (row,) = json.loads(later.stdout)
    # a node added after the gate: runs at the gate or before continue; runs that reached
    # the writer (now at 0.4) would wait
    assert row["wait_from"] == "0.3" and "agent 'writer'" in row["reason"]
    early = check("v2-early", "--strict")
    assert early.exit_code == 1 and "runs that reached node 0.0 would wait" in early.stdout
    same = check("v1", "--strict")
    assert same.exit_code == 0 and "every run would continue" in same.stdout
