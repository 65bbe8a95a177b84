"""`apm broker run|start|stop`: run the daemon in the foreground, detach it, or stop it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from broker import paths
from broker.wire.errors import BrokerUnavailable, InternalError, InvalidParameters
from broker.wire.protocol import PingResult

from . import service
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


def start_detached(extra: list[str] | None = None) -> tuple[int, bool]:
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
            daemon_argv(["--no-stderr-log", *(extra or [])]),
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
    extra = ["--log-level", args.log_level] if args.log_level else []
    if args.http:
        extra += ["--http", args.http]
    if args.allow_remote:
        extra += [
            "--allow-remote",
            "--tls-cert",
            args.tls_cert or "",
            "--tls-key",
            args.tls_key or "",
        ]
    argv = daemon_argv(extra)
    os.execv(sys.executable, argv)  # noqa: S606 - replaces this process with the daemon
    raise InternalError("exec failed")  # pragma: no cover


def _installed_manager() -> service.Manager:
    """The manager to drive: the running one, if our unit or agent is installed with it."""
    m = service.Manager.detect()
    if m.name == "systemd" and service.unit_path().exists():
        return m
    if m.name == "launchd" and service.plist_path().exists():
        return m
    return service.Manager("background-process")


def _manager_start(m: service.Manager) -> None:
    if m.name == "systemd":
        rc, out = service.run(["systemctl", "--user", "start", service.UNIT_NAME])
    else:
        rc, out = service.run(
            ["launchctl", "kickstart", f"gui/{os.getuid()}/{service.AGENT_LABEL}"]
        )
    if rc != 0:
        raise BrokerUnavailable(f"{m.name} could not start the broker: {out[:300]}")


def _wait_for_broker() -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        result = ping(timeout=0.5)
        if result is not None:
            return result.pid
        time.sleep(0.1)
    raise BrokerUnavailable("the broker did not come up in time", hint='see "apm doctor"')


def cmd_start(args: argparse.Namespace) -> int:
    m = _installed_manager()
    running = ping()
    http = ["--http", args.http] if getattr(args, "http", None) else None
    if running is not None:
        pid, started = running.pid, False
        if http:
            info(
                f'--http applies at start: "apm broker stop && apm broker start --http {args.http}"'
            )
    elif m.name == "background-process":
        pid, started = start_detached(http)
    else:
        if http:
            raise InvalidParameters(
                f"{m.name} starts this broker; its unit decides whether it serves HTTP",
                hint=f'run "apm broker install --http {args.http}"',
            )
        _manager_start(m)
        pid, started = _wait_for_broker(), True
    if args.json:
        emit_json({"pid": pid, "started": started, "manager": m.name})
    elif started:
        info(f"broker started by {m.name} (pid {pid})")
    else:
        info(f"broker already running (pid {pid})")
    return 0


def _process_command(pid: int) -> str | None:
    """The running broker's command line, to say which installation it is (Linux /proc)."""
    try:
        raw = open(f"/proc/{pid}/cmdline", "rb").read()  # noqa: SIM115 - one read
    except OSError:
        return None
    return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a) or None


def _running_broker(started_by: str, started_now: bool) -> dict[str, object] | None:
    running = ping()
    if running is None:
        return None
    return {
        "pid": running.pid,
        "version": running.version,
        "command": _process_command(running.pid),
        "started_by": started_by,
        "started_now": started_now,
    }


def _describe(broker: dict[str, object]) -> str:
    how = "started now" if broker["started_now"] else "already running"
    where = f": {broker['command']}" if broker.get("command") else ""
    return (
        f"running broker: pid {broker['pid']}, version {broker['version']}, {how} as a "
        f"{broker['started_by']}{where}"
    )


def cmd_install(args: argparse.Namespace) -> int:
    m = service.Manager.detect()
    files = service.write_service_files(http=args.http)
    if m.name != "background-process" and ping() is not None:
        # a broker started by hand (apm init/unlock) holds the socket: hand it to the manager
        cmd_stop(argparse.Namespace(json=False, quiet=True))
    if m.name == "systemd":
        for argv in (
            ["systemctl", "--user", "daemon-reload"],
            ["systemctl", "--user", "enable", "--now", service.UNIT_NAME],
        ):
            rc, out = service.run(argv)
            if rc != 0:
                raise BrokerUnavailable(f"{' '.join(argv)} failed: {out[:300]}")
        pid = _wait_for_broker()
        started_by, started_now = "systemd user service", True
    elif m.name == "launchd":
        target = f"gui/{os.getuid()}"
        service.run(["launchctl", "bootout", target, str(files[0])])
        rc, out = service.run(["launchctl", "bootstrap", target, str(files[0])])
        if rc != 0:
            raise BrokerUnavailable(f"launchctl bootstrap failed: {out[:300]}")
        pid = _wait_for_broker()
        started_by, started_now = "launchd agent", True
    else:
        pid, started_now = start_detached(["--http", args.http] if args.http else None)
        started_by = "background process"
    enabled = m.name != "background-process"
    broker = _running_broker(started_by, started_now) or {
        "pid": pid,
        "version": None,
        "command": None,
        "started_by": started_by,
        "started_now": started_now,
    }
    if args.json:
        emit_json(
            {
                "manager": m.name,
                "files": [str(f) for f in files],
                "enabled": enabled,
                "pid": pid,
                "broker": broker,
            }
        )
        return 0
    for f in files:
        info(f"wrote {f}")
    if enabled:
        info(f"enabled and started with {m.name} (pid {pid}); it starts again at login")
    else:
        info(
            "no service manager is running here (no systemd --user session, no launchd): the "
            "unit is written but NOT enabled, so nothing starts the broker at login or restarts "
            "it if it stops"
        )
        if not started_now:
            info("a broker was already running; it was left as it is")
    info(_describe(broker))
    if not enabled:
        info(
            'hint: where systemd --user runs, "apm broker install" again enables the unit; '
            'until then "apm broker start" (or apm init/unlock) starts a background broker'
        )
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    m = service.Manager.detect()
    removed: list[str] = []
    if m.name == "systemd" and service.unit_path().exists():
        service.run(["systemctl", "--user", "disable", "--now", service.UNIT_NAME])
    elif m.name == "launchd" and service.plist_path().exists():
        service.run(["launchctl", "bootout", f"gui/{os.getuid()}", str(service.plist_path())])
    else:
        cmd_stop(argparse.Namespace(json=False, quiet=True))
    for path in (service.unit_path(), service.plist_path()):
        if path.exists():
            path.unlink()
            removed.append(str(path))
    if m.name == "systemd":
        service.run(["systemctl", "--user", "daemon-reload"])
    if args.json:
        emit_json({"manager": m.name, "removed": removed})
    else:
        info(f"uninstalled ({m.name}); removed {', '.join(removed) or 'no unit file'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    m = _installed_manager()
    detected = service.Manager.detect()
    unit = service.plist_path() if detected.name == "launchd" else service.unit_path()
    written = service.unit_path().exists() or service.plist_path().exists()
    if m.name == "systemd":
        _, state = service.run(["systemctl", "--user", "is-active", service.UNIT_NAME])
    elif m.name == "launchd":
        rc, _ = service.run(["launchctl", "print", f"gui/{os.getuid()}/{service.AGENT_LABEL}"])
        state = "loaded" if rc == 0 else "not loaded"
    elif written:  # one fact per line: the file exists, and nothing manages it here
        state = "unit written, not enabled (no service manager running here)"
    else:
        state = "no unit written"
    running = ping()
    managed = (m.name == "systemd" and state == "active") or (
        m.name == "launchd" and state == "loaded"
    )
    started_by = None
    if running is not None:
        started_by = m.name if managed else "background process (not managed by a service)"
    doc = {
        "manager": m.name,
        "detected_manager": detected.name,
        "unit": str(unit),
        "unit_installed": written,
        "service_state": state,
        "broker_running": running is not None,
        "pid": running.pid if running else None,
        "version": running.version if running else None,
        "started_by": started_by,
        "command": _process_command(running.pid) if running else None,
    }
    if args.json:
        emit_json(doc)
    else:
        for k, v in doc.items():
            sys.stdout.write(f"{k + ':':<18}{v}\n")
    return 0 if running is not None else BrokerUnavailable.exit_code


def cmd_stop(args: argparse.Namespace) -> int:
    m = _installed_manager()
    if m.name == "systemd":  # else systemd would restart it (Restart=on-failure is fine, but
        service.run(["systemctl", "--user", "stop", service.UNIT_NAME])  # be explicit)
    p = paths.resolve()
    try:
        with BrokerClient() as c:
            res = c.call("broker.shutdown", timeout=5.0)
    except BrokerUnavailable:
        if getattr(args, "quiet", False):
            return 0
        if args.json:
            emit_json({"stopped": False, "running": False})
        else:
            info("broker is not running")
        return 0
    sock = p.socket_path
    deadline = time.monotonic() + 10.0
    while sock is not None and sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if getattr(args, "quiet", False):
        return 0
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
    run.add_argument("--http", metavar="127.0.0.1:PORT", help="also serve MCP over HTTP at /mcp")
    run.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --http address (needs --tls-cert and --tls-key)",
    )
    run.add_argument("--tls-cert", metavar="PEM", help="certificate for a non-loopback --http")
    run.add_argument("--tls-key", metavar="PEM", help="its private key")
    run.set_defaults(func=cmd_run)
    start = bsub.add_parser("start", help="start the broker as a background process")
    start.add_argument("--json", action="store_true", help="machine-readable output")
    start.add_argument(
        "--http", metavar="127.0.0.1:PORT", help="also serve MCP over HTTP at /mcp (loopback)"
    )
    start.set_defaults(func=cmd_start)
    stop = bsub.add_parser("stop", help="lock the vault and stop the broker")
    stop.add_argument("--json", action="store_true", help="machine-readable output")
    stop.set_defaults(func=cmd_stop)
    inst = bsub.add_parser(
        "install", help="install and start the broker as a user service (systemd / launchd)"
    )
    inst.add_argument("--http", metavar="127.0.0.1:PORT", help="also serve MCP over HTTP")
    inst.add_argument("--json", action="store_true")
    inst.set_defaults(func=cmd_install)
    un = bsub.add_parser("uninstall", help="stop and remove the user service")
    un.add_argument("--json", action="store_true")
    un.set_defaults(func=cmd_uninstall)
    st = bsub.add_parser("status", help="service manager, unit and broker state")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
