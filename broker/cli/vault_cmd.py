"""`apm init|unlock|lock|status|passwd|profile|version`: the vault's lifecycle."""

from __future__ import annotations

import argparse
import sys

from broker import __version__
from broker.wire.errors import BrokerUnavailable
from broker.wire.protocol import (
    KDF_PROFILE_NAMES,
    PROTOCOL_VERSION,
    InitParams,
    PasswdParams,
    ProfileSetParams,
)

from .broker_cmd import start_detached
from .client import BrokerClient
from .output import emit_json, info
from .prompt import Input
from .strength import check_master_password


def _client_autostart() -> BrokerClient:
    """init and unlock start the broker if it is not running (as gpg-agent does)."""
    client = BrokerClient()
    try:
        client.call("broker.ping", timeout=2.0)
    except BrokerUnavailable:
        client.close()
        pid, _ = start_detached()
        info(f"started the broker (pid {pid})")
        client = BrokerClient()
    return client


def cmd_init(args: argparse.Namespace) -> int:
    inp = Input(args.password_stdin)
    with _client_autostart() as c:
        status = c.call("broker.status")
        if status.vault_exists:
            from broker.wire.errors import AlreadyExists

            raise AlreadyExists(
                f"a vault already exists at {status.vault_path}",
                hint='unlock it with "apm unlock", or set APM_VAULT_PATH for another one',
            )
        password = inp.new_password("master password")
        check_master_password(password, allow_weak=args.allow_weak)
        info(f"deriving the key ({args.profile} profile)...")
        res = c.call("vault.init", InitParams(profile=args.profile), password=password)
    if args.json:
        emit_json(res)
    else:
        info(f"created {res.vault_path} ({res.profile} profile); the vault is unlocked")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    inp = Input(args.password_stdin)
    with _client_autostart() as c:
        password = inp.password()
        res = c.call("vault.unlock", password=password)
    if args.json:
        emit_json(res)
    else:
        info(
            f"unlocked ({res.entries} entries); auto-locks at "
            f"{res.idle_lock_at.astimezone().strftime('%H:%M')} if idle"
        )
    for warning in res.warnings:  # a rolled-back vault or audit log (also with --json)
        info(f"warning: {warning}")
    if res.warnings:
        info('hint: see "apm doctor" and "apm audit verify"; the README\'s threat model says why')
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    try:
        with BrokerClient() as c:
            res = c.call("vault.lock")
    except BrokerUnavailable:
        res = None
    if args.json:
        emit_json({"locked": True, "was_unlocked": bool(res and res.was_unlocked)})
    else:
        info("vault locked" if res and res.was_unlocked else "vault was already locked")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with BrokerClient() as c:
        st = c.call("broker.status")
    if args.json:
        emit_json(st)
        return 0
    lines = [
        f"broker:   running (pid {st.pid}, version {st.version}, protocol {st.protocol})",
        f"socket:   {st.socket}",
        f"vault:    {st.vault_path}" + ("" if st.vault_exists else " (not created yet)"),
        f"state:    {'locked' if st.locked else 'unlocked'}",
    ]
    if st.profile:
        lines.append(f"kdf:      {st.profile}")
    if not st.locked:
        lines.append(f"entries:  {st.entries}")
        if st.idle_lock_at and st.hard_lock_at:
            lines.append(
                f"locks at: {st.idle_lock_at.astimezone().strftime('%H:%M:%S')} if idle, "
                f"{st.hard_lock_at.astimezone().strftime('%Y-%m-%d %H:%M')} at the latest"
            )
    lines.append(f"log:      {st.log_path}")
    lines += [f"WARNING:  {note}" for note in st.integrity]  # rollback, deleted audit log
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    inp = Input(args.password_stdin)
    with BrokerClient() as c:
        current = inp.password("current master password")
        new = inp.new_password("new master password")
        check_master_password(new, allow_weak=args.allow_weak)
        c.call("vault.passwd", PasswdParams(new_password=new), password=current)
    info("master password changed; entries untouched (only the data key was re-wrapped)")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    inp = Input(args.password_stdin)
    with BrokerClient() as c:
        password = inp.password()
        if args.profile_cmd == "set":
            info(f"re-wrapping the data key with the {args.profile} profile...")
            res = c.call("profile.set", ProfileSetParams(profile=args.profile), password=password)
        else:
            res = c.call("profile.show", password=password)
    if args.json:
        emit_json(res)
    else:
        sys.stdout.write(
            f"{res.profile}: argon2id, {res.memory_kib // 1024} MiB, "
            f"t={res.time_cost}, p={res.parallelism}\n"
        )
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    doc: dict[str, object] = {"cli": __version__, "protocol": PROTOCOL_VERSION}
    try:
        with BrokerClient() as c:
            ping = c.call("broker.ping", timeout=2.0)
        doc["broker"] = {"version": ping.version, "protocol": ping.protocol}
    except BrokerUnavailable:
        doc["broker"] = None
    if args.json:
        emit_json(doc)
        return 0
    sys.stdout.write(f"apm {__version__} (protocol {PROTOCOL_VERSION})\n")
    b = doc["broker"]
    if isinstance(b, dict):
        sys.stdout.write(f"broker {b['version']} (protocol {b['protocol']})\n")
    else:
        sys.stdout.write("broker not running\n")
    return 0


def _allow_weak(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-weak",
        action="store_true",
        help="accept a master password the strength check calls weak (it still warns)",
    )


def _pw(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help="create a new vault (starts the broker if needed)")
    p.add_argument(
        "--profile",
        choices=KDF_PROFILE_NAMES,
        default="standard",
        help="Argon2id cost: interactive (19 MiB), standard (64 MiB, default), hardened (256 MiB)",
    )
    p.add_argument("--json", action="store_true")
    _pw(p)
    _allow_weak(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("unlock", help="unlock the vault in the broker (starts it if needed)")
    p.add_argument("--json", action="store_true")
    _pw(p)
    p.set_defaults(func=cmd_unlock)

    p = sub.add_parser("lock", help="lock the vault now (no password needed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("status", help="broker and vault state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("passwd", help="change the master password (re-wraps the data key)")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the current password, then the new one, one per line from stdin",
    )
    _allow_weak(p)
    p.set_defaults(func=cmd_passwd)

    p = sub.add_parser("profile", help="show or change the vault's key-derivation profile")
    psub = p.add_subparsers(dest="profile_cmd", required=True, metavar="COMMAND")
    show = psub.add_parser("show", help="show the current profile")
    show.add_argument("--json", action="store_true")
    _pw(show)
    show.set_defaults(func=cmd_profile)
    setp = psub.add_parser("set", help="re-wrap the data key with another profile")
    setp.add_argument(
        "profile", choices=KDF_PROFILE_NAMES, help="interactive, standard or hardened (see init)"
    )
    setp.add_argument("--json", action="store_true")
    _pw(setp)
    setp.set_defaults(func=cmd_profile)

    p = sub.add_parser("version", help="versions of the CLI, the broker and the protocol")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_version)
