"""uvicorn inside the service's own event loop, on a socket bound up front."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our event loop: the process's signals are ours, not its."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class HttpServer:
    app: FastAPI
    host: str
    port: int
    tls: tuple[str, str] | None = None  # (cert file, key file)

    def __post_init__(self):
        # Bound here, not by uvicorn, so port 0 works and the real port is known at once.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((self.host, self.port))
        except OSError as exc:
            self.socket.close()
            raise OSError(exc.errno, f"cannot bind HTTP to {self.host}:{self.port}: {exc.strerror}") from exc
        self.port = self.socket.getsockname()[1]
        cert, key = self.tls if self.tls else (None, None)
        self._config = uvicorn.Config(self.app, log_level="warning", ssl_certfile=cert, ssl_keyfile=key,
                                      lifespan="on")
        self._server = _EmbeddedUvicorn(self._config)
        # vLLM's engine-error handler stops the HTTP server it finds here when the engine
        # has died (the runner's watchdog then ends the process).
        self.app.state.server = self._server
        self._task = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.socket]))
        while not self._server.started:
            if self._task.done():  # failed at start-up: surface its exception
                self._task.result()
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.05)

    async def stop(self, grace_s: float) -> None:
        """Refuse new connections; give running requests ``grace_s``; cancel the rest."""
        self._config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True
        if self._task is not None:
            await self._task
