"""Which queues a process dequeues from (``DBOS.listen_queues`` at launch).

A process listens to the queues its pipelines use (or the ones given to
``App.listen_queues``), DBOS's start queue, and the hand-over queues of its own shapes only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..ir import Dispatch
from . import dispatch, versions
from .admission import start_queue

if TYPE_CHECKING:
    from .runs import Registered


def to_listen(dbos_name: str, listen: list[str] | None, declared: list[str],
              pipelines: Iterable[Registered], width: int) -> list[str]:
    """The queues a process dequeues from: those its pipelines use (or ``listen``, the ones
    given to ``App.listen_queues``), plus the hand-over queues of its own shapes only, so a
    run waiting for another shape never lands here (see :mod:`.versions`)."""
    regs = list(pipelines)
    if listen is not None:
        base = list(listen)
    else:
        used = (dispatch.queue_name(dbos_name, node, width)
                for reg in regs for _, node in reg.node.walk() if isinstance(node, Dispatch))
        base = list(dict.fromkeys([*declared, *(q for q in used if q is not None)]))
    return base + [start_queue(dbos_name)] + [versions.shape_queue(dbos_name, reg.version)
                                              for reg in regs]
