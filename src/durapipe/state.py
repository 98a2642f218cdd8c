"""Run state: a JSON object, checked wherever it crosses a durable boundary.

A value that cannot be stored is refused *before* it is handed to DBOS, with the node and
key in the message, so nothing half-written reaches the database and replay sees exactly
what the first execution saw.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import StateError
from .ir import template_keys

State = dict[str, Any]

MAX_DEPTH = 200
"""Deepest nesting of lists and dicts a state value may have: Postgres's jsonb and Python's
JSON encoder give out long before the thousands of levels a hostile input can reach."""

MAX_INT_DIGITS = 4300
"""Most digits an integer in state may have (Python's default int-to-str limit)."""
_INT_LIMIT = 10**MAX_INT_DIGITS


def _safe(key: str) -> str:
    """``key`` with NUL and lone surrogates escaped, so that the error itself can be stored."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _check_text(text: str, where: str, key: str, what: str) -> None:
    """Refuse text that JSON can carry but Postgres's jsonb or UTF-8 cannot read back."""
    if "\x00" in text:
        raise StateError(
            f"{where}: state {what} {_safe(key)!r} contains a NUL character (\\x00), which "
            "Postgres cannot read back as jsonb; remove it, or store binary data base64-encoded",
            node=where, key=_safe(key),
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StateError(
            f"{where}: state {what} {_safe(key)!r} contains a lone surrogate "
            f"({text[exc.start]!r} at index {exc.start}), which is not valid Unicode; "
            "decode the bytes it came from with errors='replace'",
            node=where, key=_safe(key),
        ) from None


def _normalize(value: Any, where: str, key: str, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        _check_text(value, where, key, "value at")
        return value
    if isinstance(value, int):
        if abs(value) >= _INT_LIMIT:
            raise StateError(
                f"{where}: state key {_safe(key)!r} holds an integer of more than "
                f"{MAX_INT_DIGITS} digits, which JSON cannot encode; store it as a string",
                node=where, key=_safe(key),
            )
        return value
    if depth >= MAX_DEPTH and isinstance(value, (list, tuple, dict)):
        raise StateError(
            f"{where}: state key {_safe(key[:80])!r}... nests lists and dicts more than "
            f"{MAX_DEPTH} levels deep; flatten it or store it as a JSON string",
            node=where, key=_safe(key[:80]),
        )
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StateError(
                f"{where}: state key {_safe(key)!r} holds {value!r}, which JSON cannot store; "
                "use None or a string",
                node=where, key=_safe(key),
            )
        return value
    if isinstance(value, (list, tuple)):
        return [_normalize(v, where, f"{key}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise StateError(
                    f"{where}: state key {_safe(key)!r} has a non-string dict key {k!r}; "
                    "JSON objects take string keys only",
                    node=where, key=_safe(key),
                )
            _check_text(k, where, f"{key}.{k}", "dict key")
            out[k] = _normalize(v, where, f"{key}.{k}", depth + 1)
        return out
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return _normalize(value.model_dump(mode="json"), where, key, depth)
    raise StateError(
        f"{where}: state key {_safe(key)!r} holds a {type(value).__name__}, which is not JSON; "
        "store str, int, float, bool, None, list or dict (e.g. dt.isoformat() for a datetime)",
        node=where, key=_safe(key),
    )


def check_updates(updates: Any, where: str) -> State:
    """Validate what a node returned and give back its JSON-normal form (tuples -> lists)."""
    if updates is None:
        return {}
    if not isinstance(updates, dict):
        raise StateError(
            f"{where}: returned a {type(updates).__name__}; a node returns a dict of state "
            "updates or None",
            node=where,
        )
    out: State = {}
    for k, v in updates.items():
        if not isinstance(k, str):
            raise StateError(
                f"{where}: returned the non-string state key {k!r}; state keys are strings",
                node=where, key=repr(k),
            )
        _check_text(k, where, k, "key")
        out[k] = _normalize(v, where, k)
    return out


def check_inputs(inputs: Any, pipeline: str) -> State:
    """Validate a run's initial state."""
    if inputs is None:
        return {}
    if not isinstance(inputs, dict):
        raise StateError(
            f"pipeline {pipeline!r}: inputs must be a dict of state values, "
            f"got a {type(inputs).__name__}",
            node="inputs",
        )
    return check_updates(inputs, f"pipeline {pipeline!r} inputs")


def render(template: str, state: State, where: str) -> str:
    """Fill ``{key}`` placeholders from state; a missing key names the node and the key."""
    missing = [k for k in template_keys(template) if k not in state]
    if missing:
        raise StateError(
            f"{where}: the instruction needs state key {missing[0]!r}, which is not in state "
            f"(keys present: {sorted(state)}); write it upstream or pass it as a run input",
            node=where, key=missing[0],
        )
    try:
        return template.format_map(state)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise StateError(
            f"{where}: the instruction {template!r} cannot be filled from state: "
            f"{type(exc).__name__}: {exc}; check the placeholders' format specs and indexes",
            node=where,
        ) from None
