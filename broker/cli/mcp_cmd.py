"""`apm mcp [install|uninstall|config]`: run the shim, or wire apm into an AI client's config.

Rules:
- The session token goes in the server's `env`, never in `args` (argv is visible to every
  process of the machine).
- A config file is merged, never replaced: other servers and keys survive; the previous
  version is kept as `<file>.apm-backup`; the result is written atomically with mode 0600.
- A file that is not valid JSON is never overwritten.
- Re-installing replaces the entry and revokes the session it held; uninstalling removes the
  entry and revokes its session.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from broker.wire.errors import ApmError, InvalidParameters, StorageError, VaultLocked
from broker.wire.protocol import SessionRevokeParams

from . import client_exe
from .auth import Credentials
from .client import BrokerClient
from .output import emit_json, info
from .session_cmd import _duration, create_params, describe_bindings, parse_duration

SERVER_NAME = "apm"


@dataclass(frozen=True)
class ClientSpec:
    name: str
    display: str
    servers_key: str  # "mcpServers" or "servers"
    type_field: bool  # entries carry "type": "stdio"

    def config_path(self, home: Path | None = None) -> Path:
        home = home or Path.home()
        mac = sys.platform == "darwin"
        win = sys.platform == "win32"
        appdata = Path(os.environ.get("APPDATA", str(home / "AppData" / "Roaming")))
        xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
        if self.name == "claude-desktop":
            if mac:
                return home / "Library/Application Support/Claude/claude_desktop_config.json"
            return (appdata if win else xdg) / "Claude" / "claude_desktop_config.json"
        if self.name == "claude-code":
            return home / ".claude.json"
        if self.name == "cursor":
            return home / ".cursor" / "mcp.json"
        if self.name == "vscode":
            if mac:
                return home / "Library/Application Support/Code/User/mcp.json"
            return (appdata if win else xdg) / "Code" / "User" / "mcp.json"
        return home / ".codeium" / "windsurf" / "mcp_config.json"


CLIENTS: dict[str, ClientSpec] = {
    c.name: c
    for c in (
        ClientSpec("claude-desktop", "Claude Desktop", "mcpServers", False),
        ClientSpec("claude-code", "Claude Code", "mcpServers", True),
        ClientSpec("cursor", "Cursor", "mcpServers", False),
        ClientSpec("vscode", "VS Code", "servers", True),
        ClientSpec("windsurf", "Windsurf", "mcpServers", False),
    )
}


def shim_command() -> str:
    sibling = Path(sys.executable).parent / "apm-mcp"
    if sibling.exists():
        return str(sibling)
    from shutil import which

    found = which("apm-mcp")
    if found is None:
        raise InvalidParameters(
            "cannot find the apm-mcp executable", hint="reinstall apm (pip install apm-broker)"
        )
    return str(Path(found).resolve())


def server_entry(spec: ClientSpec, token: str) -> dict[str, Any]:
    env = {"APM_EPHEMERAL_ID": token, "APM_EPHEMERAL_AGENT": spec.name}
    for var in ("APM_HOME", "APM_BROKER_ADDR", "APM_VAULT_PATH"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    entry: dict[str, Any] = {"command": shim_command(), "args": [], "env": env}
    if spec.type_field:
        entry = {"type": "stdio", **entry}
    return entry


def read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text() or "{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidParameters(
            f"{path} is not valid JSON; not touching it",
            hint="fix the file (or move it away) and run the command again",
        ) from exc
    if not isinstance(doc, dict):
        raise InvalidParameters(f"{path} does not hold a JSON object; not touching it")
    return doc


def check_shape(doc: dict[str, Any], spec: ClientSpec, name: str, path: Path) -> None:
    """Refuse (before minting anything) a config whose structure we would have to guess at."""
    servers = doc.get(spec.servers_key)
    if servers is not None and not isinstance(servers, dict):
        raise InvalidParameters(
            f"{path}: {spec.servers_key!r} is not an object; not touching it",
            hint="fix the file (or move it away) and run the command again",
        )
    entry = (servers or {}).get(name)
    if entry is not None and not (
        isinstance(entry, dict) and isinstance(entry.get("env", {}), dict)
    ):
        raise InvalidParameters(
            f"{path}: the {name!r} server entry is malformed; not touching it",
            hint="remove that entry by hand and run the command again",
        )


def write_config(path: Path, doc: dict[str, Any]) -> Path | None:
    """Atomically write `doc` (0600), keeping the previous file as `<file>.apm-backup`."""
    backup: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            backup = path.with_name(path.name + ".apm-backup")
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(path.read_bytes())
                f.flush()
                os.fsync(f.fileno())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StorageError(f"could not write {path}: {exc.strerror or exc}") from exc
    return backup


def _old_token(doc: dict[str, Any], spec: ClientSpec, name: str) -> str | None:
    entry = (doc.get(spec.servers_key) or {}).get(name)
    if isinstance(entry, dict):
        token = (entry.get("env") or {}).get("APM_EPHEMERAL_ID")
        if isinstance(token, str) and token.startswith("eps_"):
            return token
    return None


def _revoke_token(c: BrokerClient, token: str) -> list[str]:
    with contextlib.suppress(ApmError):
        res = c.call("session.revoke", SessionRevokeParams(token=SecretStr(token)))
        revoked: list[str] = res.revoked
        return revoked
    return []


def binding_for(args: argparse.Namespace, spec: ClientSpec) -> tuple[dict[str, object], str]:
    """The session's client binding (create_params overrides) and a sentence saying what it is.

    The client's real executable is looked up (client_exe.resolve); found, the session is bound
    to that file, or to the profile when it lives in a versioned directory that its updates
    replace (the native Claude Code installer). Not found: the profile alone.
    """
    if args.agent_exe:
        return {}, f"bound to --agent-exe {args.agent_exe}"
    if args.no_agent_binding:
        return {}, "not bound to a client executable (--no-agent-binding)"
    found = client_exe.resolve(spec.name)
    if not found:
        return {"agent": spec.name}, (
            f"no {spec.display} executable found on PATH, in npm's global or local prefixes or "
            f"at its installer's location; bound to the {spec.name} profile "
            f'(check with "apm doctor --client {spec.name}" once it has started)'
        )
    best = found[0]
    if best.follows_updates:
        return {"agent": spec.name, "_found": best}, (
            f"found {spec.display} at {best.path} via {best.how}; bound to the {spec.name} "
            "profile, which follows its updates"
        )
    return {"agent_exe": best.path, "_found": best}, (
        f"found {spec.display} at {best.path} via {best.how}; bound to that executable"
    )


def _mint(args: argparse.Namespace, c: BrokerClient, spec: ClientSpec) -> tuple[Any, str, Any]:
    """(session.create result, the binding sentence, the executable found or None)."""
    owner = Credentials(args, owner_only=True)
    overrides: dict[str, object] = {"label": args.label or f"{spec.name} (apm mcp install)"}
    binding, said = binding_for(args, spec)
    found = binding.pop("_found", None)
    overrides.update(binding)
    res = c.call("session.create", create_params(args, **overrides), **owner.creds())
    return res, said, found


def cmd_install(args: argparse.Namespace) -> int:
    spec = CLIENTS[args.client]
    path = Path(args.config) if args.config else spec.config_path()
    doc = read_config(path)  # refuse early, before minting anything
    check_shape(doc, spec, args.name, path)
    with BrokerClient() as c:
        c.call("broker.status")  # broker reachable before we ask for the password
        res, said, found = _mint(args, c, spec)
        token = res.token.get_secret_value()
        old = _old_token(doc, spec, args.name)
        servers = doc.get(spec.servers_key) or {}
        servers[args.name] = server_entry(spec, token)
        doc[spec.servers_key] = servers
        backup = write_config(path, doc)
        revoked = _revoke_token(c, old) if old and old != token else []
    if args.json:
        emit_json(
            {
                "client": spec.name,
                "config": str(path),
                "backup": str(backup) if backup else None,
                "accessor": res.session.accessor,
                "scopes": res.session.scopes,
                "expires_at": res.session.expires_at.isoformat(),
                "revoked": revoked,
                "executable": found.path if found else None,
                "found_via": found.how if found else None,
                "binding": said,
            }
        )
        return 0
    info(f"installed apm for {spec.display} in {path}")
    info(said)
    info(
        f"session {res.session.accessor}: {', '.join(res.session.scopes)}; "
        f"{describe_bindings(res.session.bindings)}; expires {res.session.expires_at:%Y-%m-%d}"
    )
    if backup:
        info(f"previous config kept as {backup}")
    if revoked:
        info(f"revoked the previous session {', '.join(revoked)}")
    info(f"restart {spec.display} to load it")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    spec = CLIENTS[args.client]
    path = Path(args.config) if args.config else spec.config_path()
    doc = read_config(path)
    check_shape(doc, spec, args.name, path)
    servers = doc.get(spec.servers_key)
    if not isinstance(servers, dict) or args.name not in servers:
        info(f"apm is not installed in {path}")
        return 0
    old = _old_token(doc, spec, args.name)
    with BrokerClient() as c:
        if old:
            status = c.call("broker.status")
            if status.locked:
                raise VaultLocked(
                    "the vault is locked, so the installed session cannot be revoked",
                    hint='run "apm unlock" first (nothing was changed)',
                )
        del servers[args.name]
        backup = write_config(path, doc)
        revoked = _revoke_token(c, old) if old else []
    if args.json:
        emit_json({"client": spec.name, "config": str(path), "revoked": revoked})
    else:
        info(f"removed apm from {path} (previous version: {backup})")
        info(f"revoked session {', '.join(revoked)}" if revoked else "no live session to revoke")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    spec = CLIENTS[args.client]
    with BrokerClient() as c:
        res, _, _ = _mint(args, c, spec)
    token = res.token.get_secret_value()
    entry = server_entry(spec, token)
    snippet = {spec.servers_key: {args.name: entry}}
    out: dict[str, Any] = {"client": spec.name, "path": str(spec.config_path()), "config": snippet}
    if spec.name == "cursor":
        cfg = base64.b64encode(json.dumps(entry).encode()).decode()
        out["deeplink"] = (
            f"cursor://anysphere.cursor-deeplink/mcp/install?name={args.name}&config={cfg}"
        )
    if args.json:
        emit_json({**out, "accessor": res.session.accessor})
        return 0
    sys.stdout.write(f"# {spec.display}: merge into {spec.config_path()}\n")
    sys.stdout.write(json.dumps(snippet, indent=2) + "\n")
    if "deeplink" in out:
        sys.stdout.write(
            f"# or open this link (it carries the session token):\n{out['deeplink']}\n"
        )
    info(f"session {res.session.accessor} minted; the token above is shown only this once")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from shim.main import main as shim_main

    return shim_main(["--debug"] if args.debug else [])


def _delegate_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--client", required=True, choices=sorted(CLIENTS), help="the AI client to set up"
    )
    p.add_argument("--name", default=SERVER_NAME, help="server name in the config (default apm)")
    p.add_argument("--label", help="a name for the session in listings and the audit log")
    p.add_argument(
        "--scope",
        choices=("read", "secrets", "write", "admin"),
        default="read",
        help="cumulative: read < secrets < write < admin (default read)",
    )
    p.add_argument("--ttl", type=_duration, default=parse_duration("30d"), help="default 30d")
    p.add_argument("--idle", type=_duration, help="end the session after this long unused")
    p.add_argument("--max-uses", type=int, metavar="N", help="end the session after N requests")
    p.add_argument(
        "--bind-host",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="only this machine and user (default on)",
    )
    p.add_argument("--agent-exe", metavar="PATH", help="bind to this executable instead")
    p.add_argument(
        "--agent-exe-pin",
        choices=("stat", "sha256"),
        help="with --agent-exe: also pin that file (stat: device, inode, size, mtime; sha256)",
    )
    p.add_argument(
        "--no-agent-binding",
        action="store_true",
        help="do not bind to the client's agent profile (not recommended)",
    )
    p.add_argument(
        "--pin", action="store_true", help="bind to the first process tree that uses the session"
    )
    p.add_argument(
        "--approve",
        choices=("agent", "client", "owner"),
        default="agent",
        help="who approves writes: the agent (default), the person in the client, or the owner",
    )
    p.add_argument("--space", action="append", metavar="S", help="only entries in these spaces")
    p.add_argument("--tag", action="append", metavar="T", help="only entries with these tags")
    p.add_argument("--entries", action="append", metavar="GLOB", help="only names matching")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mcp",
        help="run the MCP shim (apm-mcp), or install apm into an AI client",
        description="Without a subcommand: run the stdio MCP server (same as apm-mcp).",
    )
    p.add_argument("--debug", action="store_true", help="write mcp_logging.log (redacted)")
    p.set_defaults(func=cmd_run)
    msub = p.add_subparsers(dest="mcp_cmd", metavar="COMMAND")
    inst = msub.add_parser(
        "install",
        help="mint a session and add apm to a client's MCP config",
        description="Mint a session (default: read scope, 30 days, bound to this host and the "
        "client's agent profile) and merge an `apm` server into the client's config file.",
    )
    _delegate_opts(inst)
    inst.add_argument("--config", help="config file to edit (default: the client's own)")
    inst.set_defaults(func=cmd_install)
    un = msub.add_parser("uninstall", help="remove apm from a client's config; revoke its session")
    un.add_argument(
        "--client", required=True, choices=sorted(CLIENTS), help="the AI client to remove apm from"
    )
    un.add_argument("--name", default=SERVER_NAME, help="server name in the config (default apm)")
    un.add_argument("--config", help="config file to edit (default: the client's own)")
    un.add_argument("--json", action="store_true")
    un.set_defaults(func=cmd_uninstall)
    cfg = msub.add_parser("config", help="print the config snippet (and Cursor's deeplink)")
    _delegate_opts(cfg)
    cfg.set_defaults(func=cmd_config)
