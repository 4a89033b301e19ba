"""An ASGI app served by uvicorn in a daemon thread: the simulators and the webhook receiver
run this way in tests, the demo and `quo-sync receiver`."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Literal, Self

import httpx
import uvicorn


class BackgroundServer:
    """Binds its socket first, so port 0 gives a known port (`url`) before uvicorn serves, and
    is started once `ready_path` answers 200."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ready_path: str = "/healthz",
        name: str = "server",
        lifespan: Literal["on", "off"] = "on",
    ) -> None:
        self.app, self.host, self.port = app, host, port
        self.ready_path, self.name, self.lifespan = ready_path, name, lifespan
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> Self:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        port = sock.getsockname()[1]
        self.url = f"http://{f'[{self.host}]' if family == socket.AF_INET6 else self.host}:{port}"
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan=self.lifespan
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while True:
                try:
                    if client.get(f"{self.url}{self.ready_path}").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} did not start on {self.url}")
                time.sleep(0.02)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
