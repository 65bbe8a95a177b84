"""`apm mcp [install|uninstall|config]`: run the shim, or wire apm into an AI client's config.

Rules:
- The session token goes in the server's `env`, never in `args` (argv is visible to every
  process of the machine).
- A config file is edited, never rewritten: only the `apm` server member changes; other
  servers, keys, comments and formatting survive (JSONC, see jsonc.py); the previous version
  is kept as `<file>.apm-backup`; the result is written atomically with mode 0600.
- A file that is not valid JSON(C) is never overwritten; the refusal names line and column.
- `apm mcp config` prints a placeholder instead of a token unless `--mint`: printing a config
  should not leave a live session behind each time.
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
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from broker.wire.errors import ApmError, InvalidParameters, StorageError, VaultLocked
from broker.wire.protocol import SessionRevokeParams

from . import client_exe, jsonc
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


TOKEN_PLACEHOLDER = "<APM_EPHEMERAL_ID: run this command with --mint, or apm delegate --json>"  # noqa: S105


def server_entry(
    spec: ClientSpec, token: str, *, debug: bool = False, url: str | None = None
) -> dict[str, Any]:
    """The client's `apm` server: the stdio shim (token in env), or with `url` the HTTP
    endpoint (token in the Authorization header)."""
    if url is not None:
        http: dict[str, Any] = {"url": url, "headers": {"Authorization": f"Bearer {token}"}}
        return http if spec.name == "cursor" else {"type": "http", **http}
    env = {"APM_EPHEMERAL_ID": token, "APM_EPHEMERAL_AGENT": spec.name}
    for var in ("APM_HOME", "APM_BROKER_ADDR", "APM_VAULT_PATH"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    args = ["--debug"] if debug else []
    entry: dict[str, Any] = {"command": shim_command(), "args": args, "env": env}
    if spec.type_field:
        entry = {"type": "stdio", **entry}
    return entry


HTTP_CLIENTS = ("claude-code", "cursor", "vscode")


def http_url(args: argparse.Namespace) -> str | None:
    """The HTTP endpoint for `--transport http`: --url, else the broker's config.toml."""
    if getattr(args, "transport", "stdio") != "http":
        return None
    if args.client not in HTTP_CLIENTS:
        raise InvalidParameters(
            f"{CLIENTS[args.client].display} takes only stdio servers in its config",
            hint="use --transport stdio (the default)",
        )
    if args.url:
        return str(args.url)
    import tomllib

    from broker import paths

    try:
        conf = tomllib.loads((paths.resolve().config_dir / "config.toml").read_text())
        listen = conf.get("http", {}).get("listen")
    except (OSError, ValueError):
        listen = None
    if not isinstance(listen, str):
        raise InvalidParameters(
            "no HTTP endpoint to point the client at",
            hint='pass --url http://127.0.0.1:PORT/mcp (the broker started with "apm broker '
            'start --http 127.0.0.1:PORT"), or set [http] listen in config.toml',
        )
    return f"http://{listen}/mcp"


def read_text(path: Path) -> str:
    if not path.exists():
        return ""
    try:
        return path.read_text()
    except UnicodeDecodeError as exc:
        raise InvalidParameters(
            f"{path} is not UTF-8 text; not touching it",
            hint="fix the file (or move it away) and run the command again",
        ) from exc


def parse_config(path: Path, text: str) -> dict[str, Any]:
    try:
        doc = jsonc.parse(text)
    except jsonc.JsoncError as exc:
        raise InvalidParameters(
            f"{path}: line {exc.line}, column {exc.column}: {exc.why}; not touching it",
            hint="fix the file (or move it away) and run the command again",
        ) from exc
    if not isinstance(doc, dict):
        raise InvalidParameters(f"{path} does not hold a JSON object; not touching it")
    return doc


def read_config(path: Path) -> dict[str, Any]:
    return parse_config(path, read_text(path))


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


def write_config(path: Path, text: str) -> Path | None:
    """Atomically write `text` (0600), keeping the previous file as `<file>.apm-backup`."""
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
            f.write(text if text.endswith("\n") else text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StorageError(f"could not write {path}: {exc.strerror or exc}") from exc
    return backup


def set_server(path: Path, text: str, spec: ClientSpec, name: str, entry: Any | None) -> str:
    try:
        return jsonc.set_member(text, spec.servers_key, name, entry)
    except jsonc.JsoncError as exc:  # parse_config accepted it: only a shape we cannot edit
        raise InvalidParameters(
            f"{path}: line {exc.line}, column {exc.column}: {exc.why}; not touching it"
        ) from exc


def _old_token(doc: dict[str, Any], spec: ClientSpec, name: str) -> str | None:
    return _old_entry_token((doc.get(spec.servers_key) or {}).get(name))


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
    url = http_url(args)
    text = read_text(path)
    doc = parse_config(path, text)  # refuse early, before minting anything
    check_shape(doc, spec, args.name, path)
    with BrokerClient() as c:
        c.call("broker.status")  # broker reachable before we ask for the password
        res, said, found = _mint(args, c, spec)
        token = res.token.get_secret_value()
        old = _old_token(doc, spec, args.name)
        entry = server_entry(spec, token, debug=args.debug, url=url)
        backup = write_config(path, set_server(path, text, spec, args.name, entry))
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
                "transport": "http" if url else "stdio",
            }
        )
        return 0
    info(f"installed apm for {spec.display} in {path}" + (f" (HTTP, {url})" if url else ""))
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


def _old_entry_token(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    token = (entry.get("env") or {}).get("APM_EPHEMERAL_ID")
    auth = (entry.get("headers") or {}).get("Authorization")
    if not isinstance(token, str) and isinstance(auth, str):
        token = auth.removeprefix("Bearer ").strip()
    return token if isinstance(token, str) and token.startswith("eps_") else None


def cmd_uninstall(args: argparse.Namespace) -> int:
    spec = CLIENTS[args.client]
    path = Path(args.config) if args.config else spec.config_path()
    text = read_text(path)
    doc = parse_config(path, text)
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
        backup = write_config(path, set_server(path, text, spec, args.name, None))
        revoked = _revoke_token(c, old) if old else []
    if args.json:
        emit_json({"client": spec.name, "config": str(path), "revoked": revoked})
    else:
        info(f"removed apm from {path} (previous version: {backup})")
        info(f"revoked session {', '.join(revoked)}" if revoked else "no live session to revoke")
    return 0


def cursor_deeplink(name: str, entry: dict[str, Any]) -> str:
    """Cursor's install link: `config` is the entry's JSON in base64, URL-encoded."""
    cfg = base64.b64encode(json.dumps(entry, separators=(",", ":")).encode()).decode()
    query = urllib.parse.urlencode({"name": name, "config": cfg})
    return f"cursor://anysphere.cursor-deeplink/mcp/install?{query}"


def cmd_config(args: argparse.Namespace) -> int:
    spec = CLIENTS[args.client]
    url = http_url(args)
    res: Any = None
    said = None
    if args.mint:
        with BrokerClient() as c:
            res, said, _ = _mint(args, c, spec)
        token = res.token.get_secret_value()
    else:
        token = TOKEN_PLACEHOLDER
    entry = server_entry(spec, token, debug=args.debug, url=url)
    snippet = {spec.servers_key: {args.name: entry}}
    out: dict[str, Any] = {
        "client": spec.name,
        "path": str(spec.config_path()),
        "config": snippet,
        "transport": "http" if url else "stdio",
        "minted": bool(args.mint),
    }
    if spec.name == "cursor":
        out["deeplink"] = cursor_deeplink(args.name, entry)
    if args.json:
        emit_json({**out, "accessor": res.session.accessor if res else None})
        return 0
    sys.stdout.write(f"# {spec.display}: merge into {spec.config_path()}\n")
    sys.stdout.write(json.dumps(snippet, indent=2) + "\n")
    if "deeplink" in out:
        carries = "it carries the session token" if args.mint else "replace the placeholder first"
        sys.stdout.write(f"# or open this link ({carries}):\n{out['deeplink']}\n")
    if res is not None:
        info(said or "")
        info(f"session {res.session.accessor} minted; the token above is shown only this once")
    else:
        info(
            "no session minted: the token is a placeholder; "
            f'"apm mcp config --client {spec.name} --mint" mints one, '
            f'"apm mcp install --client {spec.name}" writes the file'
        )
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
    p.add_argument(
        "--tool-names",
        choices=("apm", "apono"),
        help="MCP names of the just-in-time tools for this session (apono: Apono Assist's "
        "user_create_request, ...); default: the broker's [mcp] tool_names",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--transport",
        choices=("stdio", "http"),
        default="stdio",
        help="stdio: the apm-mcp shim (default); http: the broker's HTTP endpoint with an "
        "Authorization header (Claude Code, Cursor, VS Code)",
    )
    p.add_argument("--url", help="with --transport http: the endpoint (default: config.toml)")
    p.add_argument("--debug", action="store_true", help="run the shim with --debug (a log file)")
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
    cfg = msub.add_parser(
        "config",
        help="print the config snippet (and Cursor's deeplink)",
        description="Print the client's config snippet, with a placeholder for the token unless "
        "--mint (which mints a session, as install does).",
    )
    _delegate_opts(cfg)
    cfg.add_argument("--mint", action="store_true", help="mint a session and print its token")
    cfg.set_defaults(func=cmd_config)
