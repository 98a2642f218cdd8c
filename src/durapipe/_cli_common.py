"""What every ``durapipe`` command shares: output consoles, options, the error guard, and
loading the user's module, App and pipeline."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from . import _render, audit
from .engine.app import App
from .engine.runs import Pipeline
from .errors import DurapipeError, OperatorError

out = Console()
err = Console(stderr=True)
F = TypeVar("F")

DbUrl = Annotated[str | None, typer.Option("--database-url", envvar="DURAPIPE_DATABASE_URL",
                                           help="postgresql://... or sqlite:///file")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
AppModule = Annotated[str | None, typer.Option(
    "--app", envvar="DURAPIPE_APP", help="Module (or file) defining the App, e.g. myproj.pipelines")]


def guarded(f: F) -> F:
    """Turn durapipe errors into one line on stderr and exit code 1."""

    @functools.wraps(f)  # type: ignore[arg-type]
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)  # type: ignore[operator]
        except DurapipeError as exc:
            err.print(Text("error:", "red") + _render.literal(f" {exc}"), highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


# -- loading user code --------------------------------------------------------------------

def load_module(spec: str) -> ModuleType:
    """Import ``pkg.module`` or a file ``path/to/file.py``."""
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise OperatorError(f"no such file {spec!r}; give a module (pkg.mod) or a .py file")
        sys.path.insert(0, str(path.parent))
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise OperatorError(f"cannot load {spec!r} as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[path.stem] = module
        loader = mod_spec.loader
        try:
            loader.exec_module(module)
        except DurapipeError:
            raise
        except Exception as exc:
            raise OperatorError(f"importing {spec!r} failed: {type(exc).__name__}: {exc}") from None
        return module
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise OperatorError(f"cannot import module {spec!r}: {exc}") from None
    except DurapipeError:
        raise
    except Exception as exc:
        raise OperatorError(f"importing {spec!r} failed: {type(exc).__name__}: {exc}") from None


def find_app(module: ModuleType) -> App:
    apps = {id(v): v for v in vars(module).values() if isinstance(v, App)}
    if len(apps) != 1:
        raise OperatorError(
            f"module {module.__name__!r} defines {len(apps)} durapipe Apps; it needs exactly one "
            "(define `app = App(...)` at module level)"
        )
    return next(iter(apps.values()))


def load_target(target: str) -> tuple[App, Pipeline]:
    """``MODULE:PIPELINE`` -> the module's App and the pipeline (attribute or registered name)."""
    module_spec, sep, name = target.rpartition(":")
    if not sep or not module_spec or not name:
        raise OperatorError(f"{target!r}: give MODULE:PIPELINE, e.g. examples/blog.py:publish")
    module = load_module(module_spec)
    app = find_app(module)
    obj = getattr(module, name, None)
    if isinstance(obj, Pipeline):
        return app, obj
    if name in app.pipelines:
        return app, Pipeline(app, app.registered(name))
    raise OperatorError(
        f"{module_spec!r} has no pipeline {name!r} (registered: {sorted(app.pipelines)})"
    )


def db_hint(database_url: str | None) -> str | None:
    """The ``--database-url`` an answer command needs: none when the environment names it."""
    if not database_url or database_url == os.environ.get("DURAPIPE_DATABASE_URL"):
        return None
    return audit.redact(database_url)


def unwrap_help(app: typer.Typer) -> None:
    """Join the lines of each paragraph of every command's help: typer keeps a docstring's
    line breaks, which breaks its prose mid-line in a terminal narrower than the source."""
    for info in app.registered_commands:
        doc = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if doc:
            info.help = re.sub(r"(?<=\S)\n(?=\S)", " ", doc)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            unwrap_help(group.typer_instance)
