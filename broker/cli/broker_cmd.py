"""`apm broker run|start|stop`: run the daemon in the foreground, detach it, or stop it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from broker import paths
from broker.wire.errors import BrokerUnavailable, InternalError
from broker.wire.protocol import PingResult

from .client import BrokerClient
from .output import emit_json, info

START_TIMEOUT = 15.0


def daemon_argv(extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "broker.server.daemon", *(extra or [])]


def ping(timeout: float = 2.0) -> PingResult | None:
    try:
        with BrokerClient() as c:
            result: PingResult = c.call("broker.ping", timeout=timeout)
            return result
    except BrokerUnavailable:
        return None


def start_detached() -> tuple[int, bool]:
    """Start the broker in the background unless one answers. Returns (pid, started_now)."""
    running = ping()
    if running is not None:
        return running.pid, False
    p = paths.resolve()
    p.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    out_path = p.state_dir / "broker.out"
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as out:
        proc = subprocess.Popen(
            daemon_argv(["--no-stderr-log"]),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = out_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise BrokerUnavailable(
                "the broker exited at start: " + (" / ".join(tail) or f"exit {proc.returncode}"),
                hint=f"see {p.log_path}",
            )
        result = ping(timeout=0.5)
        if result is not None:
            return result.pid, True
        time.sleep(0.05)
    raise BrokerUnavailable("the broker did not come up in time", hint=f"see {p.log_path}")


def cmd_run(args: argparse.Namespace) -> int:
    argv = daemon_argv(["--log-level", args.log_level] if args.log_level else [])
    os.execv(sys.executable, argv)  # noqa: S606 - replaces this process with the daemon
    raise InternalError("exec failed")  # pragma: no cover


def cmd_start(args: argparse.Namespace) -> int:
    pid, started = start_detached()
    if args.json:
        emit_json({"pid": pid, "started": started, "manager": "background-process"})
    elif started:
        info(f"broker started in the background (pid {pid})")
    else:
        info(f"broker already running (pid {pid})")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    p = paths.resolve()
    try:
        with BrokerClient() as c:
            res = c.call("broker.shutdown", timeout=5.0)
    except BrokerUnavailable:
        if args.json:
            emit_json({"stopped": False, "running": False})
        else:
            info("broker is not running")
        return 0
    sock = p.socket_path
    deadline = time.monotonic() + 10.0
    while sock is not None and sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if args.json:
        emit_json({"stopped": True, "pid": res.pid})
    else:
        info(f"broker stopped (pid {res.pid}); the vault is locked")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bp = sub.add_parser("broker", help="run, start or stop the broker daemon")
    bsub = bp.add_subparsers(dest="broker_cmd", required=True, metavar="COMMAND")
    run = bsub.add_parser("run", help="run the broker in the foreground (logs to stderr)")
    run.add_argument("--log-level", default=None, help="debug, info, warning (default info)")
    run.set_defaults(func=cmd_run)
    start = bsub.add_parser("start", help="start the broker as a background process")
    start.add_argument("--json", action="store_true", help="machine-readable output")
    start.set_defaults(func=cmd_start)
    stop = bsub.add_parser("stop", help="lock the vault and stop the broker")
    stop.add_argument("--json", action="store_true", help="machine-readable output")
    stop.set_defaults(func=cmd_stop)
