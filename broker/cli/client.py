"""The CLI's connection to the broker: one request, one response, over a ZeroMQ DEALER socket.

Rules:
- This is the only CLI module that imports zmq; it never imports `broker.core` or `server`.
- Wire errors become exceptions here, through `error_from_wire`, and nowhere else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import zmq
from pydantic import BaseModel, SecretStr

from broker import __version__, paths
from broker.wire.errors import BrokerUnavailable, InternalError, error_from_wire
from broker.wire.protocol import METHODS, PROTOCOL_VERSION, Auth, Request, Response

M = TypeVar("M", bound=BaseModel)

FAST_TIMEOUT = 10.0
KDF_TIMEOUT = 120.0  # hardened profile on a slow machine, queued behind others


class BrokerClient:
    def __init__(self, addr: str | None = None, client_name: str = "apm-cli") -> None:
        self.addr = addr or paths.resolve().broker_addr
        self.client_name = f"{client_name}/{__version__}"
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            if self.addr.startswith("ipc://") and not Path(self.addr[6:]).exists():
                raise BrokerUnavailable(f"broker is not running (no socket at {self.addr[6:]})")
            self._ctx = zmq.Context()
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.addr)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call_raw(
        self,
        method: str,
        params: BaseModel | dict[str, Any] | None = None,
        *,
        password: SecretStr | None = None,
        token: SecretStr | None = None,
        agent: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        if isinstance(params, BaseModel):
            pdict = json.loads(params.model_dump_json(context={"reveal": True}, exclude_none=True))
        else:
            pdict = params or {}
        auth = Auth(password=password, token=token, agent=agent) if (password or token) else None
        req = Request(
            v=PROTOCOL_VERSION, method=method, params=pdict, auth=auth, client=self.client_name
        )
        sock = self._socket()
        sock.send(req.encode())
        if timeout is None:
            timeout = KDF_TIMEOUT if password is not None else FAST_TIMEOUT
        deadline_ms = int(timeout * 1000)
        while True:
            if not sock.poll(deadline_ms):
                raise BrokerUnavailable(
                    f"broker did not answer within {timeout:.0f} s",
                    hint='check "apm status"; restart: "apm broker stop" then "apm broker start"',
                )
            resp = Response.model_validate_json(sock.recv())
            if resp.id == req.id:
                break
        if resp.ok:
            return resp.result or {}
        if resp.error is None:
            raise InternalError("broker sent an error without a body")
        err = resp.error
        raise error_from_wire(err.code, err.message, err.hint, err.data)

    def call(
        self,
        method: str,
        params: BaseModel | dict[str, Any] | None = None,
        *,
        password: SecretStr | None = None,
        token: SecretStr | None = None,
        agent: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call and parse the result into the method's result model."""
        result = self.call_raw(
            method, params, password=password, token=token, agent=agent, timeout=timeout
        )
        return METHODS[method][1].model_validate(result)
