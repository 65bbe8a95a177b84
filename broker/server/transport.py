"""The broker's ZeroMQ ROUTER socket: the only module of the broker that imports zmq.

Rules:
- The socket directory must be ours with mode 0700 before we bind; otherwise we refuse to start.
- One broker per socket: an flock'd lock file beside the socket; a socket file left by a
  crashed broker is replaced.
- Every message carries the kernel's peer credentials (SO_PEERCRED, exposed by libzmq as the
  `Peer-Address` property "host:uid:gid:pid"). Messages from another uid are dropped here,
  before any parsing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zmq
import zmq.asyncio

from broker.wire.errors import BrokerRunning, StorageError
from broker.wire.protocol import MAX_FRAME_BYTES

log = logging.getLogger("apm.broker.transport")

HARD_FRAME_CAP = 4 * MAX_FRAME_BYTES  # libzmq disconnects peers beyond this


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int | None


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


class Transport:
    def __init__(self, addr: str, lock_path: Path) -> None:
        self.addr = addr
        self.lock_path = lock_path
        self._lock_file: IO[str] | None = None
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_CAP)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.socket_path = Path(addr[len("ipc://") :]) if addr.startswith("ipc://") else None

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

    async def recv(self) -> tuple[bytes, list[bytes], Peer | None]:
        frames = await self.sock.recv_multipart(copy=False)
        prop = frames[-1].get("Peer-Address")
        peer = parse_peer_address(prop if isinstance(prop, str) else None)
        return frames[0].bytes, [f.bytes for f in frames[1:]], peer

    async def send(self, identity: bytes, payload: bytes) -> None:
        await self.send_frames(identity, payload)

    async def send_frames(self, identity: bytes, *frames: bytes) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self.sock.send_multipart([identity, *frames])

    def close(self) -> None:
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
