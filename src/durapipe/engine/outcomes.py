"""Expected outcomes stay out of the error log.

DBOS logs every exception that ends a workflow at ERROR with its traceback. A gate a person
rejected is a decision, not a fault: for a run that ends with :class:`GateRejected` the
record becomes one INFO line naming the run's outcome. Every other error is logged as DBOS
logs it. Installed on DBOS's logger when the engine is imported.
"""

from __future__ import annotations

import logging

from ..errors import GateRejected, error_text

_DBOS_WORKFLOW_ERROR = "Exception encountered in"


class ExpectedOutcomes(logging.Filter):
    """Turns DBOS's ERROR record of a run ended by a rejected gate into one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, GateRejected) and str(record.msg).startswith(_DBOS_WORKFLOW_ERROR):
            record.msg, record.args = "run ended as decided: %s", (error_text(exc),)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
            return logging.getLogger("dbos").isEnabledFor(logging.INFO)
        return True


def install() -> None:
    logger = logging.getLogger("dbos")
    if not any(isinstance(f, ExpectedOutcomes) for f in logger.filters):
        logger.addFilter(ExpectedOutcomes())


__all__ = ["ExpectedOutcomes", "install"]
