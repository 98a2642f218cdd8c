"""``durapipe schedules``: list the cron schedules of pipelines, pause and resume them.

    durapipe schedules                      # every schedule: app, name, pipeline, cron, status
    durapipe schedules pause nightly        # or shop:nightly when two apps have one
    durapipe schedules resume nightly
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ._cli_common import AsJson, DbUrl, guarded, out, print_json
from ._render import literal
from .engine.admin import Admin
from .engine.schedules import ScheduleInfo, list_schedules, set_paused

schedules_cli = typer.Typer(help="Cron schedules of pipelines (pipeline.schedule): list, pause, resume.",
                            invoke_without_command=True)
AppName = Annotated[str | None, typer.Option("--app", help="Only this app's schedules (its DBOS name)")]


def _table(rows: list[ScheduleInfo]) -> Table:
    table = Table(title=f"{len(rows)} schedule(s)")
    for col in ("app", "schedule", "pipeline", "cron", "status", "last fired"):
        table.add_column(col, overflow="fold")
    for s in rows:
        table.add_row(*(literal(str(v or "-")) for v in (
            s.app, s.name, s.pipeline, s.cron, s.status, s.last_fired)))
    return table


@schedules_cli.callback()
@guarded
def schedules(ctx: typer.Context, app: AppName = None, database_url: DbUrl = None,
              as_json: AsJson = False) -> None:
    """List every schedule recorded in the database."""
    if ctx.invoked_subcommand is not None:
        return
    with Admin(database_url) as admin:
        rows = list_schedules(admin.client, app)
    if as_json:
        print_json([s.to_json() for s in rows])
    else:
        out.print(_table(rows))


def _steer(name: str, paused: bool, app: str | None, database_url: str | None) -> None:
    with Admin(database_url) as admin:
        info = set_paused(admin.client, name, paused, app, url=admin.url)
    out.print(literal(f"schedule {info.app}:{info.name} {'paused' if paused else 'resumed'}"),
              highlight=False)


@schedules_cli.command("pause")
@guarded
def pause(name: Annotated[str, typer.Argument(help="the schedule (name or app:name)")],
          app: AppName = None, database_url: DbUrl = None) -> None:
    """Stop firing a schedule; its runs already started go on."""
    _steer(name, True, app, database_url)


@schedules_cli.command("resume")
@guarded
def resume(name: Annotated[str, typer.Argument(help="the schedule (name or app:name)")],
           app: AppName = None, database_url: DbUrl = None) -> None:
    """Fire a paused schedule again from its next tick."""
    _steer(name, False, app, database_url)
