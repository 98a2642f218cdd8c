"""DBOS's record of a run that ended with an error: one line, and expected outcomes not as errors.

DBOS logs every exception that ends a workflow at ERROR with its traceback. The caller gets
the error raised (and ``durapipe show`` has the step's traceback), so the log keeps one
ERROR line with the error's type and text. A gate a person rejected is a decision, not a
fault: for a run that ends with :class:`GateRejected` the record becomes one INFO line
naming the run's outcome. Installed on DBOS's logger when the engine is imported.
"""

from __future__ import annotations

import logging

from ..errors import GateRejected, error_text

_DBOS_WORKFLOW_ERROR = "Exception encountered in"


class ExpectedOutcomes(logging.Filter):
    """Turns DBOS's ERROR record of a failed run into one line: INFO for a rejected gate."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not str(record.msg).startswith(_DBOS_WORKFLOW_ERROR):
            return True
        record.exc_info, record.exc_text = None, None
        if isinstance(exc, GateRejected):
            record.msg, record.args = "run ended as decided: %s", (error_text(exc),)
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger("dbos").isEnabledFor(logging.INFO)
        record.msg = f"{record.msg} {error_text(exc)}"
        return True


def install() -> None:
    logger = logging.getLogger("dbos")
    if not any(isinstance(f, ExpectedOutcomes) for f in logger.filters):
        logger.addFilter(ExpectedOutcomes())


__all__ = ["ExpectedOutcomes", "install"]
