"""The durapipe exception tree.

::

    DurapipeError                 every error durapipe raises on purpose
    ├── BuildError                a pipeline that cannot run (caught when built or registered)
    │   └── PlanError             a goal-driven Flow that cannot be planned
    ├── StateError                a state value that cannot be stored as JSON, or a missing key
    ├── RunError                  a run that did not finish normally
    │   ├── NodeFailed            a node raised; ``cause`` holds the original error text
    │   ├── NodeTimeout           a node ran past ``node.timeout(seconds)``
    │   │   └── RunTimeout        a run ran past its deadline (``start(..., timeout=)``)
    │   ├── GateRejected          a human said no at a gate
    │   ├── RunCancelled          the run was cancelled
    │   ├── BudgetExceeded        a model call past the run's token budget (``max_tokens``)
    │   └── PipelineChanged       why a run recorded by another shape waits for a worker with it
    ├── UnknownRun                no run with that id in this app
    ├── UnknownGate               the run is not waiting at that gate
    ├── UnknownTask               no dispatch starts a background task of that name
    ├── ApprovalRefused           the answer came from someone not among the gate's approvers
    ├── AppStateError             the App was used in the wrong state (e.g. registered after launch)
    ├── OperatorError             an operator command cannot be carried out (database, module, node)
    ├── DatabaseError             the App's database cannot be reached or used (URL redacted)
    └── ModelError                a model call failed or returned an unusable answer

Every error keeps its details in ``self.data`` (a JSON object), so it survives DBOS's
portable JSON serializer and pickling alike: :func:`from_portable` rebuilds the original
class from what DBOS stored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class DurapipeError(Exception):
    """Base class. ``message`` says what went wrong and how to fix it; ``data`` holds details."""

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self).__name__, self.message, self.data))

    def __str__(self) -> str:
        return self.message

    def __getattr__(self, name: str) -> Any:
        # Details such as ``err.node`` or ``err.key`` read straight from ``data``.
        data = self.__dict__.get("data")
        if data is not None and name in data:
            return data[name]
        raise AttributeError(name)


class BuildError(DurapipeError):
    """The pipeline cannot run. The message names the node path and the fix."""


class PlanError(BuildError):
    """A Flow whose goals cannot be reached from its steps and inputs."""


class StateError(DurapipeError):
    """A state value that cannot be stored, or a key a node needs that is not in state."""


class RunError(DurapipeError):
    """A run did not finish normally."""


class NodeFailed(RunError):
    """A node raised. ``node`` is ``path:name``; ``cause`` the original error's type and text."""


class NodeTimeout(RunError):
    """A node ran past its ``timeout(seconds)``."""


class RunTimeout(NodeTimeout, TimeoutError):
    """A run ran past its deadline (``start(..., timeout=seconds)``) and was cancelled,
    with its child workflows and background tasks. Also a ``TimeoutError``."""


class GateRejected(RunError):
    """A gate was answered with a rejection."""


class RunCancelled(RunError):
    """The run was cancelled."""


class BudgetExceeded(RunError):
    """A run used its token budget (``start(..., max_tokens=)``): the model call at ``node``
    was not made. ``used`` and ``max_tokens`` hold the recorded usage and the budget."""


class PipelineChanged(RunError):
    """A run recorded by another shape passed a node that changed: replaying it would run new
    code. The run is not failed: it waits for a worker with its shape, and this error's
    message (node path, what changed, what to do) is logged and listed by ``durapipe versions``."""


class UnknownRun(DurapipeError):
    """No run with that id belongs to this app."""


class UnknownGate(DurapipeError):
    """The run is not waiting at the named gate."""


class UnknownTask(DurapipeError):
    """No dispatch of the app starts a background task of that name."""


class ApprovalRefused(DurapipeError):
    """An answer to a gate from someone who is not one of its approvers; nothing changed."""


class AppStateError(DurapipeError):
    """The App was used in a state that does not allow the call."""


class OperatorError(DurapipeError):
    """An operator command (CLI, admin API) cannot be carried out: an unreachable database,
    a module path that does not import, a node that recorded nothing."""


class DatabaseError(DurapipeError):
    """The App's database cannot be reached or used; ``url`` is the redacted URL."""


class ModelError(DurapipeError):
    """A model call failed or gave an answer that cannot be used."""


def _all_subclasses(cls: type) -> list[type]:
    out: list[type] = [cls]
    sub: type
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def _error_class(name: str) -> type[DurapipeError] | None:
    for cls in _all_subclasses(DurapipeError):
        if cls.__name__ == name:
            return cls
    return None


def _rebuild(name: str, message: str, data: dict[str, Any]) -> DurapipeError:
    cls = _error_class(name) or DurapipeError
    return cls(message, **data)


def from_portable(exc: BaseException) -> BaseException:
    """Turn DBOS's ``PortableWorkflowError`` back into the durapipe error it was stored from.

    Anything that was not a durapipe error is returned unchanged.
    """
    name = getattr(exc, "name", None)
    message = getattr(exc, "message", None)
    if isinstance(exc, DurapipeError) or not isinstance(name, str) or not isinstance(message, str):
        return exc
    cls = _error_class(name)
    if cls is None:
        return exc
    data = getattr(exc, "data", None)
    return cls(message, **(data if isinstance(data, dict) else {}))


def storable_text(text: str) -> str:
    """``text`` with NUL and lone surrogates escaped (``\\x00``, ``\\ud800``), so that
    Postgres can store it in jsonb and UTF-8 can encode it."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def message_of(exc: BaseException) -> str:
    """``str(exc)``, storable; when ``__str__`` itself raises, says so instead of raising."""
    try:
        text = str(exc)
    except Exception as failed:
        text = f"<str() of the error raised {type(failed).__name__}>"
    return storable_text(text)


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an error, also for one that came back from the database; it
    never raises, and it is storable (see :func:`storable_text`)."""
    name = getattr(exc, "name", None)
    message = getattr(exc, "message", None)
    if type(exc).__name__ == "PortableWorkflowError" and isinstance(name, str):
        return storable_text(f"{name}: {message}")
    return f"{type(exc).__name__}: {message_of(exc)}"


class UnprintableError(Exception):
    """Stands in for an exception whose text cannot be stored (``__str__`` raised, or NUL
    or lone surrogates in it): a subclass of the same name carries the storable text, so a
    step's recorded error still names the original type. Not a DurapipeError: retries
    apply as they would to the original."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_stand_in, (type(self).__name__, str(self)))


_STAND_INS: dict[str, type[UnprintableError]] = {}


def _stand_in(name: str, message: str) -> UnprintableError:
    cls = _STAND_INS.get(name)
    if cls is None:
        cls = _STAND_INS.setdefault(name, type(name, (UnprintableError,), {"__module__": __name__}))
    return cls(message)


def storable_error(exc: Exception) -> Exception:
    """``exc`` when its text can be stored as it is, else its stand-in (see above)."""
    if isinstance(exc, DurapipeError):
        return exc
    try:
        text = str(exc)
        if storable_text(text) == text:
            return exc
    except Exception:
        pass
    return _stand_in(type(exc).__name__, message_of(exc))


def storable_errors(body: Callable[[], Any]) -> Callable[[], Any]:
    """``body`` raising :func:`storable_error`'s stand-in for an error whose text cannot
    be recorded (so the step's row is written and names the error's type)."""
    if inspect.iscoroutinefunction(body):
        async def run_async() -> Any:
            try:
                return await body()
            except Exception as exc:
                clean = storable_error(exc)
                if clean is exc:
                    raise
                raise clean from exc
        return run_async

    def run() -> Any:
        try:
            return body()
        except Exception as exc:
            clean = storable_error(exc)
            if clean is exc:
                raise
            raise clean from exc
    return run
