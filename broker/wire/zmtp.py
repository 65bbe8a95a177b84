"""ZMTP 3.0 framing with the NULL mechanism: what ZeroMQ sockets speak over `ipc://`.

Stdlib only: the shim's link (shim.zmtp) and the broker's Unix transport
(broker.server.transport) both use it, and either end may still be a libzmq socket (the CLI
and the tests use pyzmq), so this follows the spec (rfc.zeromq.org/spec/23) exactly:

- greeting: 64 bytes: signature (0xFF, 8 padding bytes, 0x7F), version 3.0, mechanism "NULL"
  (zero-padded to 20 bytes), as-server 0, 31 zero bytes of filler;
- then a READY command with the socket's metadata (`Socket-Type`, and `Identity` for a DEALER
  or ROUTER, as libzmq sends it);
- then frames: a flags byte (MORE 0x01, LONG 0x02, COMMAND 0x04), the size in one byte or, with
  LONG, eight (network order), the body.

No security beyond NULL: the broker's peers are authenticated by the kernel (SO_PEERCRED on
the Unix socket, its directory 0700 and the socket 0600), not by ZMTP.
"""

from __future__ import annotations

import struct

SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
GREETING = SIGNATURE + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
GREETING_SIZE = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
_SHORT = struct.Struct("!BB")
_LONG = struct.Struct("!BQ")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class ProtocolError(Exception):
    """The peer broke ZMTP: drop the connection."""


def frame_head(flags: int, size: int) -> bytes:
    if size > 255:
        return _LONG.pack(flags | LONG, size)
    return _SHORT.pack(flags, size)


def encode(frames: tuple[bytes, ...] | list[bytes]) -> bytes:
    """One message: its frames, MORE set on every frame but the last."""
    last = len(frames) - 1
    parts = []
    for i, f in enumerate(frames):
        n = len(f)
        flags = MORE if i < last else 0
        parts.append(_LONG.pack(flags | LONG, n) if n > 255 else _SHORT.pack(flags, n))
        parts.append(f)
    return b"".join(parts)


def command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes([len(name)]) + name + body
    return frame_head(COMMAND, len(data)) + data


def ready(socket_type: bytes) -> bytes:
    props = b"".join(
        bytes([len(k)]) + k + _U32.pack(len(v)) + v
        for k, v in ((b"Socket-Type", socket_type), (b"Identity", b""))
    )
    return command(b"READY", props)


def parse_properties(data: bytes) -> dict[bytes, bytes]:
    """A READY command's metadata (names lower-cased): name-size(1) name value-size(4) value."""
    props: dict[bytes, bytes] = {}
    i = 0
    while i < len(data):
        n = data[i]
        name = data[i + 1 : i + 1 + n]
        i += 1 + n
        if i + 4 > len(data):
            raise ProtocolError("truncated property")
        (vlen,) = _U32.unpack_from(data, i)
        i += 4
        if i + vlen > len(data):
            raise ProtocolError("truncated property value")
        props[name.lower()] = data[i : i + vlen]
        i += vlen
    return props


def split_command(body: bytes) -> tuple[bytes, bytes]:
    """A command frame's name and data."""
    if not body or len(body) < 1 + body[0]:
        raise ProtocolError("malformed command")
    return body[1 : 1 + body[0]], body[1 + body[0] :]


class Decoder:
    """Bytes in, events out: the peer's greeting, its commands, its messages.

    `feed(data)`, then call `next()` until it returns None (more bytes needed). Events:
    ("command", (name, data)) and ("message", [frame, ...]); the greeting is checked and
    consumed silently. Raises ProtocolError for a peer that is not ZMTP 3 with NULL, or that
    sends a frame larger than `max_frame`.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.buf = bytearray()
        self.pos = 0
        self.greeted = False
        self.frames: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def next(self) -> tuple[str, object] | None:
        buf, pos = self.buf, self.pos
        n = len(buf)
        if not self.greeted:
            if n and buf[0] != 0xFF:
                raise ProtocolError("not a ZMTP peer")
            if n - pos < GREETING_SIZE:
                return None
            if not buf[9] & 0x01 or buf[10] < 3:
                raise ProtocolError("not a ZMTP 3 peer")
            if bytes(buf[12:32]).rstrip(b"\x00") != b"NULL":
                raise ProtocolError("the peer asks for a security mechanism other than NULL")
            self.greeted = True
            pos = self.pos = GREETING_SIZE
        while True:
            if n - pos < 2:
                return None
            flags = buf[pos]
            if flags & LONG:
                if n - pos < 9:
                    return None
                (size,) = _U64.unpack_from(buf, pos + 1)
                head = 9
            else:
                size = buf[pos + 1]
                head = 2
            if size > self.max_frame:
                raise ProtocolError("frame too large")
            end = pos + head + size
            if end > n:
                return None
            body = bytes(buf[pos + head : end])
            pos = self.pos = end
            if flags & COMMAND:
                return "command", split_command(body)
            self.frames.append(body)
            if not flags & MORE:
                frames, self.frames = self.frames, []
                return "message", frames
