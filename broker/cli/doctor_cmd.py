"""`apm doctor [--client X] [--json]`: the troubleshooting guide as a command.

Each check prints ok, or the problem and the command that fixes it. Exit 0 when every check
passes (skipped checks pass), 1 otherwise. Nothing here needs the master password.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from broker import __version__, paths
from broker.wire.errors import ApmError
from broker.wire.protocol import PROTOCOL_VERSION

from . import service
from .auth import AGENT_ENV, TOKEN_ENV
from .client import BrokerClient
from .mcp_cmd import CLIENTS, read_config, shim_command
from .output import emit_json, write_lines


@dataclass
class Check:
    name: str
    status: str  # ok | fail | warn | skip
    detail: str
    fix: str | None = None

    @property
    def passed(self) -> bool:
        return self.status != "fail"


class Doctor:
    def __init__(self, client: str | None) -> None:
        self.client = client
        self.checks: list[Check] = []
        self.paths = paths.resolve()
        self.status: Any = None
        self.ping: Any = None

    def add(self, name: str, status: str, detail: str, fix: str | None = None) -> None:
        self.checks.append(Check(name, status, detail, fix))

    def _call(self, method: str, **kw: Any) -> Any:
        with BrokerClient() as c:
            return c.call(method, timeout=5.0, **kw)

    def _blocked(self) -> tuple[str, str] | None:
        """Why sessions cannot be checked now, and the command that fixes it."""
        if self.status is None:
            return "the broker is not running", "apm broker start"
        if not self.status.vault_exists:
            return "there is no vault", "apm init"
        if self.status.locked:
            return "the vault is locked", "apm unlock"
        return None

    # ------------------------------------------------------------------ checks

    def versions(self) -> None:
        shim = "not found"
        try:
            exe = shim_command()
            r = subprocess.run(
                [exe, "--version"], capture_output=True, text=True, timeout=10, check=False
            )
            shim = (r.stderr or r.stdout).strip().split()[-1] if r.returncode == 0 else "broken"
        except (ApmError, OSError, subprocess.TimeoutExpired, IndexError):
            pass
        try:
            self.ping = self._call("broker.ping")
        except ApmError:
            self.ping = None
        detail = f"cli {__version__} (protocol {PROTOCOL_VERSION}), shim {shim}"
        if self.ping is None:
            self.add(
                "versions",
                "ok" if shim == __version__ else "fail",
                detail + ", broker ?",
                None if shim == __version__ else "reinstall apm so apm-mcp is on the same version",
            )
            return
        p = self.ping
        detail += f", broker {p.version} (protocol {p.min_protocol}..{p.protocol})"
        compatible = self.ping.min_protocol <= PROTOCOL_VERSION <= self.ping.protocol
        same = shim == __version__ == self.ping.version
        if not compatible:
            self.add(
                "versions",
                "fail",
                detail + ": protocol mismatch",
                'upgrade apm everywhere, then "apm broker stop && apm broker start"',
            )
        elif not same:
            self.add(
                "versions",
                "warn",
                detail + ": versions differ",
                '"apm broker stop && apm broker start" to run the installed version',
            )
        else:
            self.add("versions", "ok", detail)

    def broker(self) -> None:
        if self.ping is None:
            self.add(
                "broker", "fail", f"not reachable at {self.paths.broker_addr}", "apm broker start"
            )
            return
        self.status = self._call("broker.status")
        self.add("broker", "ok", f"running, pid {self.ping.pid}, at {self.paths.broker_addr}")

    def socket_modes(self) -> None:
        sock = self.paths.socket_path
        if sock is None:
            self.add("socket", "skip", "not an ipc:// socket")
            return
        if self.ping is None and not sock.parent.exists():
            self.add("socket", "skip", f"{sock.parent} does not exist yet (broker not running)")
            return
        problems = []
        for path, want in ((sock.parent, 0o700), (sock, 0o600)):
            try:
                st = path.lstat()
            except FileNotFoundError:
                if path == sock and self.ping is None:
                    continue
                problems.append(f"{path} missing")
                continue
            mode = stat.S_IMODE(st.st_mode)
            if st.st_uid != os.getuid():
                problems.append(f"{path} belongs to uid {st.st_uid}")
            elif mode != want:
                problems.append(f"{path} has mode {mode:04o}, expected {want:04o}")
        if problems:
            self.add(
                "socket",
                "fail",
                "; ".join(problems),
                f"chmod 700 {sock.parent}; apm broker stop && apm broker start",
            )
        else:
            self.add("socket", "ok", f"{sock.parent} 0700, socket 0600")

    def vault(self) -> None:
        st = self.status
        if st is None:
            exists = self.paths.vault.exists()
            self.add(
                "vault",
                "ok" if exists else "fail",
                f"{self.paths.vault} {'exists' if exists else 'missing'} (broker down)",
                None if exists else "apm init",
            )
            return
        if not st.vault_exists:
            self.add("vault", "fail", f"no vault at {st.vault_path}", "apm init")
        elif st.locked:
            self.add("vault", "fail", f"{st.vault_path} is locked (kdf {st.profile})", "apm unlock")
        else:
            self.add(
                "vault", "ok", f"{st.vault_path} unlocked, {st.entries} entries, kdf {st.profile}"
            )

    def integrity(self) -> None:
        """A rolled-back vault or audit log, a log deleted under the broker (core/rollback.py):
        what the broker noticed, and `audit.verify` against the vault's record of the log."""
        st = self.status
        if st is None or not st.vault_exists:
            self.add("vault integrity", "skip", "broker not running or no vault")
            self.add("audit", "skip", "broker not running or no vault")
            return
        notes = list(st.integrity)
        vault_notes = [n for n in notes if not n.startswith("audit")]
        audit_notes = [n for n in notes if n.startswith("audit")]
        fix = 'apm audit verify; see "Threat model" in the README'
        if vault_notes:
            self.add("vault integrity", "fail", " | ".join(vault_notes), fix)
        else:
            self.add("vault integrity", "ok", "no rollback noticed by this broker")
        if st.locked:
            status = "warn" if audit_notes else "skip"
            self.add("audit", status, " | ".join(audit_notes) or "not verified: vault locked")
            return
        res = self._call("audit.verify")
        if res.findings:
            self.add("audit", "fail", " | ".join([*res.findings[:3], *audit_notes]), fix)
        elif res.warnings or audit_notes:
            self.add("audit", "warn", " | ".join([*audit_notes, *res.warnings[-3:]]), fix)
        else:
            self.add("audit", "ok", f"{res.records} records, chain intact, as the vault recorded")

    def session(self) -> None:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            self.add("session", "skip", f"no {TOKEN_ENV} in this environment")
            return
        blocked = self._blocked()
        if blocked is not None:
            self.add("session", "fail", f"cannot check the session: {blocked[0]}", blocked[1])
            return
        with BrokerClient() as c:
            d = c.call(
                "session.diagnose",
                token=SecretStr(token),
                agent=os.environ.get(AGENT_ENV) or None,
                timeout=5.0,
            )
        if not d.known:
            self.add("session", "fail", f"{TOKEN_ENV}: {d.problem}", "apm delegate")
        elif d.problem:
            self.add(
                "session",
                "fail",
                f"{d.accessor} ({d.state}) would be refused for this process: {d.problem}",
                f"apm session why {d.accessor}; or apm delegate for this process",
            )
        else:
            self.add(
                "session",
                "ok",
                f"{d.accessor}: {d.scope}, works for this process, "
                f"expires {d.expires_at:%Y-%m-%d %H:%M}",
            )

    def clients(self) -> None:
        names = [self.client] if self.client else sorted(CLIENTS)
        for name in names:
            spec = CLIENTS[name]
            path = spec.config_path()
            label = f"client {name}"
            try:
                doc = read_config(path)
            except ApmError as exc:
                self.add(
                    label, "fail", exc.message, f"fix {path}, then apm mcp install --client {name}"
                )
                continue
            servers = doc.get(spec.servers_key) or {}
            entry = servers.get("apm") if isinstance(servers, dict) else None
            malformed = not isinstance(servers, dict) or (
                entry is not None
                and not (isinstance(entry, dict) and isinstance(entry.get("env", {}), dict))
            )
            if malformed:
                self.add(
                    label,
                    "fail",
                    f"{path}: the MCP servers section is malformed",
                    f"fix {path}, then apm mcp install --client {name}",
                )
                continue
            if not isinstance(entry, dict):
                status = "fail" if self.client else "skip"
                self.add(
                    label,
                    status,
                    f"apm not configured in {path}",
                    f"apm mcp install --client {name}" if status == "fail" else None,
                )
                continue
            self._client_entry(label, name, path, entry)

    def _client_entry(self, label: str, name: str, path: Path, entry: dict[str, Any]) -> None:
        command = str(entry.get("command", ""))
        if not (Path(command).is_file() and os.access(command, os.X_OK)):
            self.add(
                label,
                "fail",
                f"{path}: command {command!r} does not exist",
                f"apm mcp install --client {name}",
            )
            return
        token = (entry.get("env") or {}).get(TOKEN_ENV)
        if not isinstance(token, str) or not token:
            self.add(
                label,
                "fail",
                f"{path}: no {TOKEN_ENV} in the server's env",
                f"apm mcp install --client {name}",
            )
            return
        blocked = self._blocked()
        if blocked is not None:
            self.add(label, "warn", f"{path} ok; session not checked: {blocked[0]}", blocked[1])
            return
        with BrokerClient() as c:
            d = c.call("session.diagnose", token=SecretStr(token), timeout=5.0)
        if not d.known or d.state != "active":
            self.add(
                label,
                "fail",
                f"{path}: its session is {d.state or 'unknown'}",
                f"apm mcp install --client {name}",
            )
            return
        denied = recent_denial(self.paths.state_dir / "audit.jsonl", d.accessor)
        if denied is not None:
            reason = str(denied.get("reason", "unknown"))
            who = f"pid {denied.get('pid')}" + (
                f", client {denied['client']!r}" if denied.get("client") else ""
            )
            binding = "binding" in reason or "agent" in reason
            self.add(
                label,
                "fail",
                f"{path}: session {d.accessor} was refused at {denied.get('ts', '?')[:19]} "
                f"({who}): {reason}",
                f"apm mcp install --client {name} (binds to the client's executable found "
                f'now), then restart {spec_display(name)}; details: "apm session why {d.accessor}"'
                if binding
                else f"apm session why {d.accessor}",
            )
        else:
            self.add(
                label,
                "ok",
                f"{path} -> {command}, session {d.accessor} ({d.scope}), "
                f"expires {d.expires_at:%Y-%m-%d}",
            )

    def service_unit(self) -> None:
        m = service.Manager.detect()
        unit = service.plist_path() if m.name == "launchd" else service.unit_path()
        if m.name == "background-process":
            self.add(
                "service",
                "skip" if self.ping else "warn",
                "no service manager running; the broker runs as a background process",
                None if self.ping else "apm broker start",
            )
            return
        if not unit.exists():
            self.add(
                "service",
                "warn",
                f"{m.name}: apm is not installed as a service",
                "apm broker install",
            )
            return
        if m.name == "systemd":
            r = subprocess.run(
                ["systemctl", "--user", "is-active", service.UNIT_NAME],
                capture_output=True,
                text=True,
                check=False,
            )
            state = r.stdout.strip()
            ok = state == "active"
            self.add(
                "service",
                "ok" if ok else "fail",
                f"systemd unit {unit}: {state}",
                None
                if ok
                else f"systemctl --user restart {service.UNIT_NAME}; "
                f"journalctl --user -u {service.UNIT_NAME}",
            )
        else:
            self.add("service", "ok", f"launch agent {unit}")

    def debug_log(self) -> None:
        path = self.paths.config_dir / "mcp_logging.log"
        if not path.exists():
            self.add("debug log", "skip", f"{path} (not written yet; apm-mcp --debug writes it)")
            return
        lines = path.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if " ERROR " in ln or " WARNING " in ln][-3:]
        if errors:
            self.add("debug log", "warn", f"{path}; last problems: " + " | ".join(errors))
        else:
            self.add("debug log", "ok", f"{path}, no errors")

    def run(self) -> list[Check]:
        for step in (
            self.versions,
            self.broker,
            self.socket_modes,
            self.vault,
            self.integrity,
            self.session,
            self.clients,
            self.service_unit,
            self.debug_log,
        ):
            try:
                step()
            except ApmError as exc:
                self.add(step.__name__, "fail", exc.message, exc.hint)
            except Exception as exc:  # one broken check must not hide the others
                self.add(
                    step.__name__,
                    "fail",
                    f"the check itself failed: {exc!r}"[:300],
                    "report this; the other checks ran",
                )
        return self.checks


def spec_display(name: str) -> str:
    return CLIENTS[name].display


def recent_denial(
    audit: Path, accessor: str | None, within: timedelta = timedelta(days=1)
) -> dict[str, Any] | None:
    """The last `session.denied` record of `accessor` in the audit log, when it came within
    `within` and no use of the session was recorded after it (None: nothing to report).

    Read directly (same user, no password needed): the log holds no secret values. Refusals
    for a missing scope are the model asking for too much, not a broken client: skipped.
    """
    if not accessor:
        return None
    try:
        with open(audit, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - (1 << 20)))
            lines = f.read().splitlines()
    except OSError:
        return None
    since = datetime.now(UTC) - within
    last: dict[str, Any] | None = None
    for raw in lines:
        if accessor.encode() not in raw:
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(doc, dict) or doc.get("session") != accessor:
            continue
        if doc.get("event") == "session.denied":
            if not str(doc.get("reason", "")).startswith("scope lacks"):
                last = doc
        elif last is not None:
            last = None  # used successfully since
    if last is None:
        return None
    try:
        at = datetime.fromisoformat(str(last.get("ts")))
    except ValueError:
        return last
    return last if at >= since else None


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = Doctor(args.client).run()
    ok = all(c.passed for c in checks)
    if args.json:
        emit_json({"ok": ok, "checks": [asdict(c) for c in checks]})
        return 0 if ok else 1
    for c in checks:
        mark = {"ok": "ok  ", "skip": "--  ", "warn": "warn", "fail": "FAIL"}[c.status]
        # details may name sessions, clients and processes: escaped (#13.1)
        write_lines([f"{mark} {c.name}: {c.detail}"])
        if c.fix and c.status in ("fail", "warn"):
            write_lines([f"     fix: {c.fix}"])
    sys.stdout.write("all checks passed\n" if ok else "some checks failed\n")
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check everything and print the fix for each problem",
        description="Checks versions, the broker, socket modes, the vault, the session in "
        "APM_EPHEMERAL_ID, installed client configs, the service unit and the debug log. "
        "Exits 0 when every check passes.",
    )
    p.add_argument("--client", choices=sorted(CLIENTS), help="also require this client's config")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
