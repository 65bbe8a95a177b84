"""The broker's ROUTER socket: the only module of the broker that speaks to its peers' sockets.

Two implementations behind one interface (`Transport(addr, lock_path)` picks):
- `UnixTransport` for ipc:// on Linux: ZMTP 3.0 (NULL mechanism) spoken by the broker itself
  over a Unix socket (broker.wire.zmtp). Its peers are libzmq DEALERs (the CLI) or the shim's
  own ZMTP link; no libzmq I/O thread sits between their bytes and the event loop, which took
  a thread hand-off and an eventfd wake-up out of every message each way.
- `Transport` itself: a libzmq ROUTER (pyzmq), for other addresses, other platforms, or
  APM_BROKER_TRANSPORT=libzmq.

Rules:
- The socket directory must be ours with mode 0700 before we bind; otherwise we refuse to start.
- One broker per socket: an flock'd lock file beside the socket; a socket file left by a
  crashed broker is replaced.
- Every message carries the kernel's peer credentials: SO_PEERCRED of the accepted connection
  (libzmq exposes the same as the `Peer-Address` property "host:uid:gid:pid"). Messages from
  another uid are dropped by the receiver, before any parsing.
- Receiving never blocks: every message that has arrived is handed to the receiver callback a
  batch at a time (a readable connection, or up to BATCH libzmq messages); sends never block
  (a ROUTER drops what it cannot route, and what a peer does not read in time).
- libzmq's descriptor is edge-triggered and a send may consume the edge that announces incoming
  messages, so after each send outside a batch the libzmq socket is asked (ZMQ_EVENTS) and a
  batch is scheduled if anything is waiting. zmq.asyncio's futures and the event-loop turns
  they cost were a quarter of the broker's time per tool call.
- The libzmq hot path calls pyzmq's compiled socket methods with int flags: the `zmq.Socket`
  wrappers and their enum arithmetic cost ~6 µs per frame sent; a received frame's `more` flag
  replaces getsockopt(RCVMORE) (each getsockopt builds an enum).
- Work that should follow a batch (the audit checkpoint) can be queued with `after_batch`: it
  runs when the batch ends, without an event-loop turn of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, cast

import zmq
from zmq.backend import Socket as _RawSocket

from broker.wire import zmtp
from broker.wire.errors import BrokerRunning, StorageError
from broker.wire.protocol import MAX_FRAME_BYTES

from .peer import Peer

log = logging.getLogger("apm.broker.transport")

HARD_FRAME_CAP = 4 * MAX_FRAME_BYTES  # libzmq disconnects peers beyond this
BATCH = 64  # messages received per wake-up before other work gets a turn
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | _NOBLOCK
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_send = _RawSocket.send  # compiled: no wrapper, no enum arithmetic
_recv = _RawSocket.recv
_get = _RawSocket.get
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


_PEERS: dict[str, Peer | None] = {}  # Peer-Address -> Peer: one parse per connection
_PEERS_KEPT = 4096


def peer_of(value: object) -> Peer | None:
    """`parse_peer_address` of a message's property, parsed once per distinct value (a Peer
    is frozen, so every message of a connection can share it)."""
    if not isinstance(value, str):
        return None
    try:
        return _PEERS[value]
    except KeyError:
        pass
    if len(_PEERS) >= _PEERS_KEPT:
        _PEERS.clear()
    peer = _PEERS[value] = parse_peer_address(value)
    return peer


def parse_peer_address(value: str | None) -> Peer | None:
    if not value:
        return None
    parts = value.rsplit(":", 3)
    try:
        if len(parts) == 4:
            return Peer(uid=int(parts[1]), gid=int(parts[2]), pid=int(parts[3]) or None)
        if len(parts) == 3:  # macOS: no pid
            return Peer(uid=int(parts[1]), gid=int(parts[2]), pid=None)
    except ValueError:
        return None
    return None


def ensure_private_dir(path: Path) -> None:
    """Create `path` 0700, or verify an existing one is a real directory of ours with 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from exc
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{path} is not a directory", hint="remove it and start again")
    if st.st_uid != os.getuid():
        raise StorageError(
            f"{path} belongs to uid {st.st_uid}, not to us",
            hint="set APM_HOME or XDG_RUNTIME_DIR to a directory you own",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        raise StorageError(
            f"{path} has mode {mode:04o}; it must be 0700",
            hint=f'run "chmod 700 {path}" after checking nobody else uses it',
        )


Receiver = Callable[[bytes, list[bytes], Peer | None], None]


class Transport:
    """The libzmq ROUTER; `Transport(addr, ...)` gives a UnixTransport where `serves_unix`."""

    def __new__(cls, addr: str, lock_path: Path) -> Transport:
        if cls is Transport and serves_unix(addr):
            return super().__new__(UnixTransport)
        return super().__new__(cls)

    def __init__(self, addr: str, lock_path: Path) -> None:
        self.addr = addr
        self.lock_path = lock_path
        self._lock_file: IO[str] | None = None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_CAP)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.socket_path = Path(addr[len("ipc://") :]) if addr.startswith("ipc://") else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver: Receiver | None = None
        self._fd: int | None = None
        self._draining = False  # inside a batch: its own recv loop sees what a send uncovers
        self._scheduled = False
        self._after: list[Callable[[], None]] = []  # run when the current batch ends

    def bind(self) -> None:
        if self.socket_path is not None:
            ensure_private_dir(self.socket_path.parent)
        ensure_private_dir(self.lock_path.parent)
        self._acquire_lock()
        if self.socket_path is not None and (
            self.socket_path.exists() or self.socket_path.is_symlink()
        ):
            log.warning("replacing stale socket %s left by a previous broker", self.socket_path)
            self.socket_path.unlink()
        self.sock.bind(self.addr)
        if self.socket_path is not None:
            os.chmod(self.socket_path, 0o600)

    def _acquire_lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        f = os.fdopen(fd, "r+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = f.read().strip()
            f.close()
            raise BrokerRunning(
                f"another broker (pid {holder or '?'}) is already running on {self.addr}"
            ) from exc
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f

    def start(self, receiver: Receiver) -> None:
        """Hand every message to `receiver(identity, frames, peer)` from now on (on this loop)."""
        self._loop = asyncio.get_running_loop()
        self._receiver = receiver
        self._fd = int(self.sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._drain)
        self._schedule()  # messages may have queued before we watched the descriptor

    def stop(self) -> None:
        if self._loop is not None and self._fd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        self._receiver = None
        self._fd = None

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None and self._receiver is not None:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def after_batch(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the batch being received ends (True), or say there is none."""
        if not self._draining:
            return False
        self._after.append(callback)
        return True

    def _drain(self) -> None:
        self._scheduled = False
        receiver = self._receiver
        if receiver is None:
            return
        sock = self.sock
        self._draining = True
        try:
            for _ in range(BATCH):
                try:
                    first = _recv(sock, _NOBLOCK, False)
                    frames = []
                    frame = first
                    while frame.more:  # (a frame's flag: getsockopt would cost an enum)
                        frame = _recv(sock, _NOBLOCK, False)
                        frames.append(frame.bytes)
                except zmq.ZMQError:  # nothing more for now (zmq.Again), or closed at shutdown
                    return
                peer = peer_of(first.get("Peer-Address"))
                _deliver(receiver, first.bytes, frames, peer)
            self._scheduled = True  # more may be waiting: after the others had a turn
            if self._loop is not None:
                self._loop.call_soon(self._drain)
        finally:
            self._draining = False
            if self._after:
                self._run_after()

    def _run_after(self) -> None:
        """The work queued by `after_batch`, once the batch that queued it is handled."""
        after, self._after = self._after, []
        for callback in after:
            try:
                callback()
            except Exception:
                log.error("after-batch work failed", exc_info=True)

    def send(self, identity: bytes, payload: bytes) -> None:
        self.send_frames(identity, payload)

    def send_frames(self, identity: bytes, *frames: bytes) -> None:
        sock = self.sock
        try:
            _send(sock, identity, _MORE)
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                _send(sock, frame, _NOBLOCK if i == last else _MORE)
        except zmq.ZMQError:  # a ROUTER drops what it cannot route; a closed socket at exit
            pass
        if not self._draining and self._receiver is not None:
            with contextlib.suppress(zmq.ZMQError):
                if int(_get(sock, _EVENTS)) & _POLLIN:
                    self._schedule()

    def close(self) -> None:
        self.stop()
        self.sock.close(linger=0)
        self.ctx.term()
        self._remove_files()

    def _remove_files(self) -> None:
        """The socket file and the lock this broker held, gone at close."""
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self._lock_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            self._lock_file.close()
            self._lock_file = None


# ---------------------------------------------------------------------------- ZMTP over Unix


def _deliver(receiver: Receiver, identity: bytes, frames: list[bytes], peer: Peer | None) -> None:
    try:
        receiver(identity, frames, peer)
    except Exception:  # one bad message must not stop the broker listening
        log.error("message handler failed", exc_info=True)


class _Conn:
    __slots__ = ("dec", "fd", "identity", "out", "peer", "ready", "sock")

    def __init__(self, sock: socket.socket, identity: bytes, peer: Peer | None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.identity = identity
        self.peer = peer
        self.dec = zmtp.Decoder(HARD_FRAME_CAP)
        self.out = bytearray()
        self.ready = False


def _peer_cred(sock: socket.socket) -> Peer | None:
    """The kernel's SO_PEERCRED for a Unix connection (what libzmq exposes as Peer-Address)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(uid=uid, gid=gid, pid=pid or None)


def serves_unix(addr: str) -> bool:
    """Whether `addr` is served by UnixTransport: ipc:// on Linux (SO_PEERCRED), unless
    APM_BROKER_TRANSPORT=libzmq asks for the libzmq ROUTER."""
    return (
        addr.startswith("ipc://")
        and not addr.startswith("ipc://@")
        and sys.platform == "linux"
        and os.environ.get("APM_BROKER_TRANSPORT", "") != "libzmq"
    )


class UnixTransport(Transport):
    """The broker's ROUTER for ipc:// on Linux, speaking ZMTP 3.0 (NULL) itself over a Unix
    socket: no libzmq I/O thread between the peer's bytes and the event loop, so a message
    costs no thread hand-off (and no eventfd wake-up) each way.

    Same contract as the libzmq ROUTER it replaces (peers are libzmq DEALERs: the CLI, or the
    shim's own ZMTP link): each connection gets a routing id; a message is handed over with
    its peer's kernel credentials (SO_PEERCRED, read once at accept); a send to an unknown or
    not yet ready peer is dropped, as is one a peer does not read in time (more than
    OUT_CAP bytes waiting); a frame over HARD_FRAME_CAP or a protocol error ends the
    connection. Receiving is level-triggered: each readable connection is one batch
    (`after_batch` work runs when it ends). Running out of file descriptors pauses accepting
    for a moment instead of aborting the process (libzmq asserts on EMFILE), and a connection
    without a handshake after HANDSHAKE_SECONDS is dropped (libzmq's ZMQ_HANDSHAKE_IVL).
    """

    OUT_CAP = 64 << 20
    HANDSHAKE_SECONDS = 30.0

    def __init__(self, addr: str, lock_path: Path) -> None:  # (no zmq context)
        self.addr = addr
        self.lock_path = lock_path
        self._lock_file = None
        self.socket_path = Path(addr[len("ipc://") :])
        self._loop = None
        self._receiver = None
        self._fd = None
        self._draining = False
        self._scheduled = False
        self._after = []
        self._listener: socket.socket | None = None
        self._conns: dict[bytes, _Conn] = {}
        self._next_id = int.from_bytes(os.urandom(4), "big")

    def bind(self) -> None:
        path = Path(self.addr[len("ipc://") :])
        ensure_private_dir(path.parent)
        ensure_private_dir(self.lock_path.parent)
        self._acquire_lock()
        if path.exists() or path.is_symlink():
            log.warning("replacing stale socket %s left by a previous broker", path)
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(256)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock

    def start(self, receiver: Receiver) -> None:
        self._loop = asyncio.get_running_loop()
        self._receiver = receiver
        if self._listener is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)
        for conn in self._conns.values():
            self._loop.add_reader(conn.fd, self._readable, conn)

    def stop(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(Exception):
                if self._listener is not None:
                    loop.remove_reader(self._listener.fileno())
                for conn in self._conns.values():
                    loop.remove_reader(conn.fd)
                    loop.remove_writer(conn.fd)
        self._receiver = None

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        listener, loop = self._listener, self._loop
        if listener is None or loop is None:
            return
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: try again shortly, never abort
                log.warning("cannot accept a connection: %s; pausing for 100 ms", exc.strerror)
                loop.remove_reader(listener.fileno())
                loop.call_later(0.1, self._resume_accepting)
                return
            sock.setblocking(False)
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF
            conn = _Conn(sock, b"\x00" + self._next_id.to_bytes(4, "big"), _peer_cred(sock))
            self._conns[conn.identity] = conn
            conn.out += zmtp.GREETING + zmtp.ready(b"ROUTER")
            self._flush(conn)
            if conn.identity in self._conns and self._receiver is not None:
                loop.add_reader(conn.fd, self._readable, conn)
                loop.call_later(self.HANDSHAKE_SECONDS, self._handshake_due, conn)

    def _handshake_due(self, conn: _Conn) -> None:
        """A connection that has not completed its handshake by now is dropped (libzmq's
        ZMQ_HANDSHAKE_IVL, 30 s by default): idle half-open peers do not pile up fds."""
        if not conn.ready and self._conns.get(conn.identity) is conn:
            log.info("dropping a connection (pid %s): no handshake", getattr(conn.peer, "pid", "?"))
            self._drop(conn)

    def _resume_accepting(self) -> None:
        if self._listener is not None and self._loop is not None and self._receiver is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.get(conn.identity) is conn:
            del self._conns[conn.identity]
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(conn.fd)
                self._loop.remove_writer(conn.fd)
        conn.ready = False
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _readable(self, conn: _Conn) -> None:
        receiver = self._receiver
        if receiver is None or self._conns.get(conn.identity) is not conn:
            return
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.dec.feed(data)
        self._draining = True
        try:
            while (event := conn.dec.next()) is not None:
                kind, value = event
                if kind == "command":
                    self._command(conn, *cast("tuple[bytes, bytes]", value))
                elif not conn.ready:
                    raise zmtp.ProtocolError("a message before the handshake")
                else:
                    _deliver(receiver, conn.identity, cast("list[bytes]", value), conn.peer)
                if self._conns.get(conn.identity) is not conn:
                    break
        except zmtp.ProtocolError as exc:
            log.info("dropping a connection (pid %s): %s", getattr(conn.peer, "pid", "?"), exc)
            self._drop(conn)
        finally:
            self._draining = False
            if self._after:
                self._run_after()

    def _command(self, conn: _Conn, name: bytes, data: bytes) -> None:
        if name == b"READY" and not conn.ready:
            kind = zmtp.parse_properties(data).get(b"socket-type")
            if kind not in (b"DEALER", b"REQ", b"ROUTER"):
                raise zmtp.ProtocolError(f"a {kind!r} socket cannot talk to a ROUTER")
            conn.ready = True
        elif name == b"ERROR":
            raise zmtp.ProtocolError("the peer ended the handshake")
        elif name == b"PING" and conn.ready and len(data) >= 2:
            conn.out += zmtp.command(b"PONG", data[2:18])
            self._flush(conn)

    # ------------------------------------------------------------------ sending

    def send_frames(self, identity: bytes, *frames: bytes) -> None:
        conn = self._conns.get(identity)
        if conn is None or not conn.ready:
            return  # a ROUTER drops what it cannot route
        data = zmtp.encode(frames)
        if conn.out:
            if len(conn.out) < self.OUT_CAP:  # else dropped, as at a ROUTER's high-water mark
                conn.out += data
            return
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(conn)
            return
        if n < len(data):
            conn.out += memoryview(data)[n:]
            if self._loop is not None:
                self._loop.add_writer(conn.fd, self._writable, conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            del conn.out[:n]
        if conn.out and self._loop is not None:
            self._loop.add_writer(conn.fd, self._writable, conn)

    def _writable(self, conn: _Conn) -> None:
        self._flush(conn)
        if not conn.out and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(conn.fd)

    def close(self) -> None:
        self.stop()
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._remove_files()
