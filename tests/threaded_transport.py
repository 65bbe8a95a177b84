"""A real broker Transport served on its own event loop (a thread), and a libzmq DEALER to talk
to it: what tests/test_transport.py and tests/test_hot_path.py drive with real peers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import zmq

from broker.server.transport import Receiver, Transport


@contextlib.contextmanager
def threaded_transport(
    tmp_path: Path, receiver_for: Callable[[Transport], Receiver]
) -> Iterator[Transport]:
    """A Transport bound under `tmp_path/run` and started with `receiver_for(transport)`, which
    runs on the transport's loop (so it may use `asyncio.get_running_loop()`). Connect to
    `transport.addr`. The loop wakes only for the transport's own work and for the stop at the
    end: no periodic wake-up hides a message the transport failed to notice."""
    run_dir = tmp_path / "run"
    addr = f"ipc://{run_dir}/t.sock"
    ready = threading.Event()
    box: list[tuple[Transport, asyncio.AbstractEventLoop, asyncio.Event]] = []
    failed: list[BaseException] = []

    async def serve() -> None:
        stop = asyncio.Event()
        transport = Transport(addr, run_dir / "t.lock")
        try:
            transport.bind()
            transport.start(receiver_for(transport))
            box.append((transport, asyncio.get_running_loop(), stop))
        finally:
            ready.set()
        try:
            await stop.wait()
        finally:
            transport.close()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported by the test thread below
            failed.append(exc)
            ready.set()

    server = threading.Thread(target=run, daemon=True)
    server.start()
    assert ready.wait(10), "the transport did not start"
    assert box, f"the transport did not start: {failed!r}"
    transport, loop, stop = box[0]
    try:
        yield transport
    finally:
        loop.call_soon_threadsafe(stop.set)
        server.join(10)
        assert not server.is_alive(), "the transport's loop did not stop"
        assert not failed, f"the transport's loop failed: {failed!r}"


def dealer(addr: str) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    """A libzmq DEALER (as the CLI uses) connected to `addr`; close it with linger 0."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    return ctx, sock
