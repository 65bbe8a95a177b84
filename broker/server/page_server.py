"""The approval page on its own loopback port, for a broker without a loopback HTTP listener:
the page's routes (`approval_page`) behind the HTTP listener's connection layer (`http`).
"""

from __future__ import annotations

import logging

from .approval_page import Page, page_origins
from .http import ConnectionGate, HttpGate, _protocol_class, _Server
from .limits import HttpLimits, current_nofile
from .state import State

log = logging.getLogger("apm.broker.page")


class PageServer:
    """The page on its own loopback port, for a broker without a loopback HTTP listener. The
    connection layer is the HTTP listener's: another uid's connection is reset at accept."""

    def __init__(self, state: State, port: int = 0) -> None:
        self.state = state
        self.port = port
        self._server: _Server | None = None

    async def start(self) -> None:
        import socket

        import uvicorn
        from starlette.applications import Starlette

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        page = Page(self.state, page_origins(self.port))
        app = HttpGate(Starlette(routes=page.routes()), self.state)
        gate = ConnectionGate(HttpLimits().within(current_nofile()), allow_remote=False)
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            http=_protocol_class(gate),
            proxy_headers=False,
        )
        self._server = _Server(config)
        if not await self._server.launch(sockets=[sock]):
            raise RuntimeError("the approval page did not start")
        self.state.links.base = f"http://localhost:{self.port}"
        log.info("approval page at http://localhost:%d/approve/...", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop_serving()
