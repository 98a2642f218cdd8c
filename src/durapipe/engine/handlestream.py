"""Reading a run's event stream from its handle: ``handle.stream()`` / ``stream_async()``.

>>> for event in handle.stream():              # from offset 0 until the run ends
...     print(event.offset, event.type.value, event.path, event.name)
>>> async for event in handle.stream_async(from_offset=17):   # resume after offset 16
...     ...

Works for any run of the app: started here, by another process, or before a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from .eventread import Event, EventReader, follow_async

if TYPE_CHECKING:
    from .app import App
    from .runhandle import RunStatus


class StreamMixin:
    """The stream methods of :class:`~durapipe.engine.runhandle.RunHandle`."""

    app: App
    run_id: str

    status: Callable[[], RunStatus]

    def _reader(self) -> EventReader:
        schema = str(self.app.dbos_config().get("dbos_system_schema") or "dbos")
        return EventReader(self.app.database_url, schema)

    def stream(self, from_offset: int = 0, *, timeout: float | None = None) -> Iterator[Event]:
        """Yield the run's events in order from ``from_offset`` until the run ends.

        A reader that stops resumes with ``from_offset=last.offset + 1`` and misses nothing.
        ``timeout`` bounds the wait for each next event (``TimeoutError``); the run goes on.
        """
        self.status()  # one of this app's runs
        with self._reader() as reader:
            yield from reader.follow(self.run_id, from_offset, timeout=timeout)

    async def stream_async(self, from_offset: int = 0, *,
                           timeout: float | None = None) -> AsyncIterator[Event]:
        """:meth:`stream` as an async iterator: ``async for event in handle.stream_async():``."""
        await asyncio.to_thread(self.status)
        schema = str(self.app.dbos_config().get("dbos_system_schema") or "dbos")
        async for event in follow_async(self.app.database_url, self.run_id, from_offset,
                                        schema=schema, timeout=timeout):
            yield event
