"""The broker's ZeroMQ ROUTER socket: the only module of the broker that imports zmq.

Rules:
- The socket directory must be ours with mode 0700 before we bind; otherwise we refuse to start.
- One broker per socket: an flock'd lock file beside the socket; a socket file left by a
  crashed broker is replaced.
- Every message carries the kernel's peer credentials (SO_PEERCRED, exposed by libzmq as the
  `Peer-Address` property "host:uid:gid:pid"). Messages from another uid are dropped here,
  before any parsing.
- The socket is a plain (synchronous) pyzmq socket watched by the event loop: when its file
  descriptor turns readable, every queued message is received without blocking and handed to
  the receiver callback, a batch at a time; sends never block (a ROUTER drops what it cannot
  route). zmq.asyncio's futures and the event-loop turns they cost were a quarter of the
  broker's time per tool call.
- libzmq's descriptor is edge-triggered and a send may consume the edge that announces incoming
  messages, so after each send outside a batch the socket is asked (ZMQ_EVENTS) and a batch is
  scheduled if anything is waiting.
- The hot path calls pyzmq's compiled socket methods with int flags: the `zmq.Socket` wrappers
  and their enum arithmetic cost ~6 µs per frame sent (4 frames per MCP answer); a received
  frame's `more` flag replaces getsockopt(RCVMORE) (each getsockopt builds an enum).
- Work that should follow a batch (the audit checkpoint) can be queued with `after_batch`: it
  runs when the batch ends, without an event-loop turn of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

import zmq
from zmq.backend import Socket as _RawSocket

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
                try:
                    receiver(first.bytes, frames, peer)
                except Exception:  # one bad message must not stop the broker listening
                    log.error("message handler failed", exc_info=True)
            self._scheduled = True  # more may be waiting: after the others had a turn
            if self._loop is not None:
                self._loop.call_soon(self._drain)
        finally:
            self._draining = False
            if self._after:
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
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self._lock_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            self._lock_file.close()
            self._lock_file = None
