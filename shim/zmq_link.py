"""The shim's link to a broker address that is not `ipc://` (through pyzmq and libzmq).

The same interface as `shim.zmtp.Link`, which serves `ipc://` addresses without libzmq. Loaded
only for other addresses, so a shim on the default address never imports zmq.

A DEALER for the broker and its monitor, attached before connecting so no event is missed.
`on_up` runs on HANDSHAKE_SUCCEEDED, not CONNECTED: with zmq.IMMEDIATE a send fails until the
ZMTP handshake is done, and an attach tried at CONNECTED waited for the 100 ms retry.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import zmq
from zmq.backend import Socket as _RawSocket

# the relay's per-message socket calls use pyzmq's compiled methods with int flags: the
# `zmq.Socket` wrappers and their enum arithmetic cost several µs per frame
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | _NOBLOCK
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_send = _RawSocket.send
_recv = _RawSocket.recv
_get = _RawSocket.get


def monitor_event(frames: list[bytes]) -> int | None:
    """The event number of a ZeroMQ monitor message (frame 1: uint16 event, uint32 value)."""
    if len(frames) != 2 or len(frames[0]) != 6:
        return None
    event: int = struct.unpack("=Hi", frames[0])[0]
    return event


class ZmqLink:
    def __init__(
        self,
        addr: str,
        on_message: Callable[[list[bytes]], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
    ) -> None:
        self.addr = addr
        self.on_message = on_message
        self.on_up = on_up
        self.on_down = on_down
        self.ctx = zmq.Context()
        self.sock, self.monitor = self._socket()
        self.poller: zmq.Poller | None = None
        self.watched: tuple[object, object, int | None] = (None, None, None)

    def _socket(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # never queue onto a connection that is not up: a message sent into a broker's dying
        # connection would be lost; sending fails instead and we retry
        sock.setsockopt(zmq.IMMEDIATE, 1)
        monitor: zmq.Socket[bytes] = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        sock.connect(self.addr)
        return sock, monitor

    def send(self, frames: list[bytes] | tuple[bytes, ...]) -> bool:
        sock = self.sock
        try:
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                _send(sock, frame, _NOBLOCK if i == last else _MORE)
        except zmq.ZMQError:  # no live connection (zmq.IMMEDIATE)
            return False
        return True

    def reset(self) -> None:
        """A fresh socket drops whatever the old one queued (it is not delivered later)."""
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.sock, self.monitor = self._socket()

    def wait(self, fd: int | None, timeout: float) -> bool:
        if self.poller is None or self.watched != (self.sock, self.monitor, fd):
            self.poller = zmq.Poller()
            if fd is not None:
                self.poller.register(fd, zmq.POLLIN)
            self.poller.register(self.sock, zmq.POLLIN)
            self.poller.register(self.monitor, zmq.POLLIN)
            self.watched = (self.sock, self.monitor, fd)
        events = dict(self.poller.poll(max(0, int(timeout * 1000 + 0.999))))
        if self.monitor in events:
            self._on_monitor()
        if self.sock in events:
            self._receive()
        return fd is not None and fd in events

    def _on_monitor(self) -> None:
        try:
            event = monitor_event(self.monitor.recv_multipart())
        except zmq.ZMQError:
            return
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.on_up()
        elif event == zmq.EVENT_DISCONNECTED:
            self.on_down()

    def _receive(self) -> None:
        """Every message the socket holds now (the poller said it has one). Whether more are
        waiting is asked (ZMQ_EVENTS) rather than learned from a zmq.Again."""
        sock = self.sock
        while True:
            try:
                frame = _recv(sock, _NOBLOCK, False)
                frames = [frame.bytes]
                while frame.more:  # (a frame's flag: getsockopt(RCVMORE) would cost more)
                    frame = _recv(sock, _NOBLOCK, False)
                    frames.append(frame.bytes)
            except zmq.ZMQError:  # nothing after all, or the socket went away
                return
            self.on_message(frames)
            if sock is not self.sock:  # replaced: the poller watches the new one
                return
            try:
                if not int(_get(sock, _EVENTS)) & _POLLIN:
                    return
            except zmq.ZMQError:
                return

    def close(self, sent_last: bool = False) -> None:
        if sent_last:  # a last message (a detach) gets a moment to leave via libzmq's thread
            time.sleep(0.01)
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()
