"""The CLI's connection to the broker: one request, one response, over a ZeroMQ DEALER socket.

Rules:
- This is the only CLI module that imports zmq; it never imports `broker.core` or `server`.
- Wire errors become exceptions here, through `error_from_wire`, and nowhere else.
- Importing it loads no pydantic: the one-shot commands (`get`, `totp`, `run`) send plain dicts
  shaped as `broker.wire.protocol.Request`; models are parsed only by `call`, which imports the
  protocol on first use (tests/test_cli_oneshot.py holds both to the same frames).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import zmq

from broker import __version__, paths
from broker.wire.errors import BrokerUnavailable, InternalError, error_from_wire

if TYPE_CHECKING:
    from pydantic import BaseModel

PROTOCOL_VERSION = 1  # broker.wire.protocol.PROTOCOL_VERSION; a test keeps them equal
FAST_TIMEOUT = 10.0
KDF_TIMEOUT = 120.0  # hardened profile on a slow machine, queued behind others


class Secret(Protocol):
    """A password or token held so it stays out of reprs: pydantic's SecretStr, or auth.Token."""

    def get_secret_value(self) -> str: ...


def request_frame(
    method: str,
    params: dict[str, Any],
    *,
    password: Secret | None = None,
    token: Secret | None = None,
    agent: str | None = None,
    client: str | None = None,
) -> tuple[str, bytes]:
    """The frame `Request(...).encode()` would send (ids are 32 hex digits), and its id."""
    req_id = os.urandom(16).hex()
    req: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": req_id, "method": method}
    req["params"] = params
    if password is not None or token is not None:
        auth: dict[str, str] = {}
        if password is not None:
            auth["password"] = password.get_secret_value()
        if token is not None:
            auth["token"] = token.get_secret_value()
        if agent is not None:
            auth["agent"] = agent
        req["auth"] = auth
    if client is not None:
        req["client"] = client
    return req_id, json.dumps(req, separators=(",", ":")).encode()


def _params_dict(params: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, dict):
        return params
    out: dict[str, Any] = json.loads(
        params.model_dump_json(context={"reveal": True}, exclude_none=True)
    )
    return out


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
        password: Secret | None = None,
        token: Secret | None = None,
        agent: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        # auth goes out only with a password or a token, as Request(auth=None) would
        has_auth = bool(password is not None and password.get_secret_value()) or bool(
            token is not None and token.get_secret_value()
        )
        req_id, frame = request_frame(
            method,
            _params_dict(params),
            password=password if has_auth else None,
            token=token if has_auth else None,
            agent=agent if has_auth else None,
            client=self.client_name,
        )
        sock = self._socket()
        sock.send(frame)
        if timeout is None:
            timeout = KDF_TIMEOUT if password is not None else FAST_TIMEOUT
        deadline_ms = int(timeout * 1000)
        while True:
            if not sock.poll(deadline_ms):
                raise BrokerUnavailable(
                    f"broker did not answer within {timeout:.0f} s",
                    hint='check "apm status"; restart: "apm broker stop" then "apm broker start"',
                )
            resp = _response(sock.recv())
            if resp.get("id") == req_id:
                break
        if resp.get("ok") is True:
            result = resp.get("result")
            return result if isinstance(result, dict) else {}
        err = resp.get("error")
        if not isinstance(err, dict):
            raise InternalError("broker sent an error without a body")
        code, message = err.get("code"), err.get("message")
        if not isinstance(code, str) or not isinstance(message, str):
            raise InternalError("broker sent a malformed error")
        hint = err.get("hint")
        data = err.get("data")
        raise error_from_wire(
            code,
            message,
            hint if isinstance(hint, str) else None,
            data if isinstance(data, dict) else None,
        )

    def call(
        self,
        method: str,
        params: BaseModel | dict[str, Any] | None = None,
        *,
        password: Secret | None = None,
        token: Secret | None = None,
        agent: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call and parse the result into the method's result model."""
        from broker.wire.protocol import METHODS

        result = self.call_raw(
            method, params, password=password, token=token, agent=agent, timeout=timeout
        )
        return METHODS[method][1].model_validate(result)


def _response(frame: bytes) -> dict[str, Any]:
    """A response frame as a dict, or INTERNAL_ERROR if it is not one (Response's shape)."""
    try:
        resp = json.loads(frame)
    except ValueError as exc:
        raise InternalError("broker sent a frame that is not JSON") from exc
    if not isinstance(resp, dict) or not isinstance(resp.get("ok"), bool):
        raise InternalError("broker sent a malformed response")
    return resp
