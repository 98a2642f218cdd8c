"""``durapipe approve``, ``reject`` and ``pending``: answer the gates runs wait at, from the
database alone (no App is launched, so nothing is recovered).

    durapipe pending                                  # every gate waiting, with its answer command
    durapipe approve RUN_ID GATE --by alice [--comment ...] [--app MODULE]
    durapipe reject RUN_ID GATE --by alice
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.table import Table

from . import _render
from ._cli_common import AppModule, AsJson, DbUrl, db_hint, find_app, guarded, load_module, out, print_json
from .engine.admin import Admin
from .engine.scope import Owner
from .errors import OperatorError


def _decide(approve: bool, run_id: str, gate: str, by: str, comment: str | None,
            app_module: str | None, database_url: str | None) -> None:
    """Answer from the database alone (no App is launched, so nothing is recovered): the
    run's own app, or with ``--app`` only a run of that module's App."""
    owner = url = None
    if app_module:
        app = find_app(load_module(app_module))
        owner, url = Owner(app.name, app.dbos_name), database_url or app.database_url
    elif not (database_url or os.environ.get("DURAPIPE_DATABASE_URL")):
        raise OperatorError("no database given: pass --database-url, set DURAPIPE_DATABASE_URL, "
                            "or give --app MODULE (the module defining the App names its database)")
    with Admin(url or database_url) as admin:
        answered = admin.answer(run_id, gate, "approved" if approve else "rejected", by, comment,
                                app=owner, exactly_one=True)
    where = f" (waited at by {answered})" if answered != run_id else ""
    out.print(_render.literal(f"{'approved' if approve else 'rejected'} gate {gate!r} of run "
                              f"{run_id}{where} by {by}"), highlight=False)


@guarded
def approve(run_id: str, gate: str,
            by: Annotated[str, typer.Option("--by", help="who decides")],
            comment: Annotated[str | None, typer.Option("--comment")] = None,
            app_module: AppModule = None, database_url: DbUrl = None) -> None:
    """Approve a gate a run is waiting at (from the database alone; --app: only that App's runs)."""
    _decide(True, run_id, gate, by, comment, app_module, database_url)


@guarded
def reject(run_id: str, gate: str,
           by: Annotated[str, typer.Option("--by", help="who decides")],
           comment: Annotated[str | None, typer.Option("--comment")] = None,
           app_module: AppModule = None, database_url: DbUrl = None) -> None:
    """Reject a gate a run is waiting at (the run fails with GateRejected)."""
    _decide(False, run_id, gate, by, comment, app_module, database_url)


@guarded
def pending(run_id: Annotated[str | None, typer.Option("--run")] = None,
            database_url: DbUrl = None, as_json: AsJson = False) -> None:
    """Gates that runs are waiting at."""
    with Admin(database_url) as admin:
        gates = admin.waiting_gates(run_id)
    if as_json:
        print_json(gates)
        return
    table = Table(title=f"{len(gates)} gate(s) waiting")
    for col in ("run", "gate", "message", "approvers", "requested"):
        table.add_column(col, overflow="fold")
    for g in gates:
        table.add_row(*(_render.literal(v) for v in (
            g["run_id"], g.get("gate"), g.get("message") or "",
            ", ".join(map(str, g.get("approvers") or [])) or "anyone", _render.requested(g.get("requested_at")))))
    out.print(table)
    for g in gates:
        out.print(_render.literal("answer: " + _render.answer_command(
            g["run_id"], str(g.get("gate")), g.get("approvers"), db_hint(database_url))),
            highlight=False, soft_wrap=True)
