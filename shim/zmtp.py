"""The shim's link to the broker: a ZMTP 3.0 DEALER spoken over a stdlib Unix socket.

The broker binds a ZeroMQ ROUTER on `ipc://PATH`, which is a Unix stream socket carrying ZMTP.
Speaking ZMTP here instead of through libzmq takes a thread hop out of every message each way
(libzmq hands every send and receive to its I/O thread) and `import zmq` out of the cold start.

What the broker's socket uses, and so all this speaks: ZMTP 3.0 framing, the NULL security
mechanism (no CURVE, no ZAP handler), a DEALER peer (`Socket-Type` and an empty `Identity` in
READY, as libzmq's DEALER sends; the ROUTER then picks the routing id). The broker learns who
we are from the kernel (SO_PEERCRED on the accepted connection), exactly as with libzmq.

Rules:
- Only the standard library (the shim is stdlib + pyzmq, and pyzmq is no longer needed here).
- Never blocks: the socket is non-blocking; what the kernel cannot take now waits in `out`
  and leaves when the socket turns writable (the caller polls for it: `wants_write`).
- `send` refuses (False) while the handshake is not done, as a libzmq DEALER with
  ZMQ_IMMEDIATE does: a message is never queued for a connection that is not up.
- A broken or refused connection is retried after 100 ms, doubling up to 1 s (libzmq's
  RECONNECT_IVL / RECONNECT_IVL_MAX as the shim set them).
- A peer that breaks the protocol (bad greeting, oversized frame, not a ROUTER) is dropped.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable
from typing import cast

from broker.wire.zmtp import (
    GREETING,
    Decoder,
    ProtocolError,
    command,
    encode,
    parse_properties,
    ready,
)

MAX_FRAME = 256 << 20  # a frame claiming more than this is a broken peer
MAX_PENDING_OUT = 64 << 20  # bytes waiting for the kernel before sends are refused
RECONNECT_IVL, RECONNECT_IVL_MAX = 0.1, 1.0


class Link:
    """One DEALER connection to `path`, reconnecting on its own.

    `on_up()` runs when a handshake completes (libzmq's HANDSHAKE_SUCCEEDED), `on_down()` when
    an established connection ends (DISCONNECTED), `on_message(frames)` for each message.
    """

    def __init__(
        self,
        path: str,
        on_message: Callable[[list[bytes]], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
    ) -> None:
        self.path = path
        self.on_message = on_message
        self.on_up = on_up
        self.on_down = on_down
        self.sock: socket.socket | None = None
        self.ready = False
        self.dec = Decoder(MAX_FRAME)
        self.out = bytearray()
        self.gen = 0  # counts connections: a callback may end the one being read
        self.next_try = 0.0  # monotonic time of the next connection attempt
        self.ivl = RECONNECT_IVL
        self.closed = False
        self._poller: select.poll | None = None
        self._watching: tuple[object, ...] = ()
        self.connect()

    # ------------------------------------------------------------------ connection

    def fileno(self) -> int | None:
        return self.sock.fileno() if self.sock is not None else None

    @property
    def wants_write(self) -> bool:
        return bool(self.out)

    def timeout(self, now: float) -> float | None:
        """Seconds until the link needs `tick` (a reconnection attempt), or None."""
        if self.sock is not None or self.closed:
            return None
        return max(0.0, self.next_try - now)

    def tick(self, now: float) -> None:
        if self.sock is None and not self.closed and now >= self.next_try:
            self.connect()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError:  # no broker (ENOENT, ECONNREFUSED) or its backlog full (EAGAIN)
            sock.close()
            self._retry_later()
            return
        self.sock = sock
        self.gen += 1
        self.ready = False
        self.dec = Decoder(MAX_FRAME)
        # the whole greeting and READY at once: libzmq reads what has arrived
        self.out[:] = GREETING + ready(b"DEALER")
        self._flush()

    def _retry_later(self) -> None:
        self.next_try = time.monotonic() + self.ivl
        self.ivl = min(self.ivl * 2, RECONNECT_IVL_MAX)

    def _drop(self) -> None:
        """The connection ended (or broke the protocol): forget it, retry shortly."""
        was_ready = self.ready
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.gen += 1
        self.ready = False
        self.out.clear()
        if not self.closed:
            self._retry_later()
        if was_ready:
            self.on_down()

    def reset(self) -> None:
        """A fresh connection now: whatever the old one held is dropped, unannounced."""
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.gen += 1
        self.ready = False
        self.out.clear()
        self.ivl = RECONNECT_IVL
        self.connect()

    def close(self, sent_last: bool = False) -> None:
        self.closed = True
        if self.sock is not None:
            self._flush()  # (a last message, such as a detach, goes if the kernel takes it)
            self.sock.close()
            self.sock = None
        self.ready = False

    # ------------------------------------------------------------------ sending

    def send(self, frames: list[bytes] | tuple[bytes, ...]) -> bool:
        """Queue one message; False when no connection is up (nothing was queued)."""
        if not self.ready or len(self.out) > MAX_PENDING_OUT:
            return False
        data = encode(frames)
        if self.out:
            self.out += data
            return True
        try:
            n = self.sock.send(data) if self.sock is not None else 0
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop()
            return False
        if n < len(data):
            self.out += data[n:]
        return True

    def _flush(self) -> None:
        while self.out and self.sock is not None:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                return
            except OSError:
                self._drop()
                return
            del self.out[:n]

    def on_writable(self) -> None:
        self._flush()

    def wait(self, fd: int | None, timeout: float) -> bool:
        """Poll the connection and `fd` (stdin) up to `timeout` seconds; serve the connection
        (its callbacks run here). Returns whether `fd` is readable."""
        sock = self.sock
        mask = select.POLLIN | (select.POLLOUT if self.out else 0)
        watching = (fd, sock, mask)
        poller = self._poller
        if poller is None or self._watching != watching:  # (rebuilt only when this changes)
            poller = self._poller = select.poll()
            self._watching = watching
            if fd is not None:
                poller.register(fd, select.POLLIN)
            if sock is not None:
                poller.register(sock, mask)
        link_timeout = self.timeout(time.monotonic())
        if link_timeout is not None:
            timeout = min(timeout, link_timeout)
        try:
            events = poller.poll(max(0, int(timeout * 1000 + 0.999)))
        except InterruptedError:
            events = []
        ready = False
        for what, ev in events:
            if what == fd:
                ready = True
            elif sock is not None and sock is self.sock:
                if ev & select.POLLOUT:
                    self.on_writable()
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self.on_readable()
        self.tick(time.monotonic())
        return ready

    # ------------------------------------------------------------------ receiving

    def on_readable(self) -> None:
        """Read what the socket holds and hand over every complete message."""
        sock, gen = self.sock, self.gen
        while sock is not None and gen == self.gen:
            try:
                chunk = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return
                chunk = b""
            if not chunk:
                self._drop()
                return
            self.dec.feed(chunk)
            try:
                self._parse(gen)
            except ProtocolError:
                if gen == self.gen:
                    self._drop()
                return
            if len(chunk) < (1 << 16):
                return  # (a short read: the socket is empty now)

    def _parse(self, gen: int) -> None:
        dec = self.dec
        while (event := dec.next()) is not None:
            kind, value = event
            if kind == "command":
                self._on_command(*cast("tuple[bytes, bytes]", value))
            elif not self.ready:
                raise ProtocolError("a message before the handshake")
            else:
                self.on_message(cast("list[bytes]", value))
            if gen != self.gen:
                return  # a callback ended or replaced the connection (and its decoder)

    def _on_command(self, name: bytes, data: bytes) -> None:
        if name == b"READY" and not self.ready:
            if parse_properties(data).get(b"socket-type") != b"ROUTER":
                raise ProtocolError("the broker's socket is not a ROUTER")
            self.ready = True
            self.ivl = RECONNECT_IVL
            self.on_up()
        elif name == b"ERROR":
            raise ProtocolError("the broker refused the handshake")
        elif name == b"PING" and self.ready and len(data) >= 2:
            # a ZMTP 3.1 heartbeat (TTL, then up to 16 bytes of context): answer with the context
            self.out += command(b"PONG", data[2:18])
            self._flush()
        # anything else (PONG, SUBSCRIBE...) means nothing to a DEALER: ignored


def ipc_path(addr: str) -> str | None:
    """The socket path of an `ipc://` address this link can serve (Unix only), else None."""
    if not addr.startswith("ipc://") or os.name != "posix":
        return None
    path = addr[len("ipc://") :]
    # libzmq reads a leading "@" as an abstract-namespace socket
    if path.startswith("@"):
        return "\x00" + path[1:]
    return path
