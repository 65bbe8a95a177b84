"""`apm add --batch`, `apm vault backup` and `apm vault migrate`: the vault's storage commands.

Rules:
- A batch line's values are never printed or put in an error: refusals name the line and the
  field paths only.
- A batch goes to the broker in as few `entry.add_batch` calls as the frame limit allows;
  `--atomic` needs it to fit in one (one commit), and says so when it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import IO, Any

from pydantic import SecretStr, ValidationError

from broker.wire.errors import AlreadyExists, ApmError, InvalidParameters, StorageError
from broker.wire.protocol import (
    BATCH_MAX,
    MAX_FRAME_BYTES,
    EntryAddParams,
    EntryBatchParams,
    SecretValue,
    VaultBackupParams,
    VaultMigrateParams,
)

from .auth import Credentials
from .client import BrokerClient
from .output import emit_json, info

BATCH_KEYS = {"type", "name", "space", "fields", "secrets", "tags", "url", "notes"}
CHUNK_BYTES = MAX_FRAME_BYTES * 3 // 4  # room for the envelope and JSON escaping

BATCH_HELP = (
    "add many entries from a JSON Lines file (or - for stdin), one entry per line: "
    '{"type": "login", "name": "...", "space": "default", "fields": {...}, '
    '"secrets": {...}, "tags": [...]}. WARNING: a file on disk holds the secrets in '
    "plaintext: prefer piping into --batch -, and delete any such file afterwards"
)


def add_batch_options(p: argparse.ArgumentParser) -> None:
    """The options `apm add` gets for bulk adds (TYPE and NAME are then left out)."""
    p.add_argument("--batch", metavar="FILE", help=BATCH_HELP)
    p.add_argument(
        "--atomic",
        action="store_true",
        help="with --batch: all or nothing (the first refused line refuses the whole batch)",
    )


def _line_error(lineno: int, message: str, **data: Any) -> InvalidParameters:
    return InvalidParameters(
        f"line {lineno}: {message}", data={"line": lineno, **data}, hint="fix that line"
    )


def parse_batch(stream: IO[str]) -> list[tuple[int, EntryAddParams]]:
    """(line number, entry) for every non-blank line; the first bad line is an error."""
    out: list[tuple[int, EntryAddParams]] = []
    for lineno, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            raise _line_error(lineno, "not valid JSON") from None
        if not isinstance(doc, dict):
            raise _line_error(lineno, "expected a JSON object")
        unknown = sorted(set(doc) - BATCH_KEYS)
        if unknown:
            raise _line_error(lineno, "unknown key(s)", keys=[k[:64] for k in unknown][:10])
        secrets = doc.get("secrets") or {}
        if not isinstance(secrets, dict) or not all(isinstance(v, str) for v in secrets.values()):
            raise _line_error(lineno, "secrets must map field names to strings", field="secrets")
        doc["secrets"] = {k: SecretValue(value=SecretStr(v)) for k, v in secrets.items()}
        doc.setdefault("space", "default")
        try:
            params = EntryAddParams.model_validate(doc)
        except ValidationError as exc:
            fields = sorted({".".join(str(x) for x in e["loc"]) for e in exc.errors()})
            raise _line_error(lineno, "invalid " + ", ".join(fields), fields=fields) from None
        out.append((lineno, params))
    if not out:
        raise InvalidParameters("the batch has no entries", hint="one JSON object per line")
    return out


def chunks(items: list[tuple[int, EntryAddParams]]) -> list[list[tuple[int, EntryAddParams]]]:
    """Split into batches that fit in a frame."""
    out: list[list[tuple[int, EntryAddParams]]] = [[]]
    size = 0
    for item in items:
        n = len(item[1].model_dump_json(context={"reveal": True})) + 16
        if out[-1] and (size + n > CHUNK_BYTES or len(out[-1]) >= BATCH_MAX):
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


def send_batch(
    client: BrokerClient,
    items: list[tuple[int, EntryAddParams]],
    creds: dict[str, Any],
    *,
    atomic: bool = False,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Add `items` ((line or position, entry)) through `entry.add_batch`, as few calls as the
    frame limit allows. Returns the added ids and the refusals ({line, code, message}).
    Importers call this too. `atomic` needs one call: refused with INVALID_PARAMETERS if the
    batch does not fit, and any refusal raises, naming its line, with nothing added."""
    parts = chunks(items)
    if atomic and len(parts) > 1:
        raise InvalidParameters(
            f"an atomic batch must fit in one request; this one needs {len(parts)}",
            hint="split the file, or drop --atomic",
        )
    added: list[str] = []
    refused: list[dict[str, Any]] = []
    for part in parts:
        params = EntryBatchParams(entries=[e for _, e in part], atomic=atomic)
        try:
            res = client.call("entry.add_batch", params, **creds)
        except ApmError as exc:
            index = exc.data.get("index")
            if isinstance(index, int) and 0 <= index < len(part):
                line = part[index][0]
                exc.message = f"line {line}: {exc.message}; nothing was added"
                exc.data = {**exc.data, "line": line}
            raise
        added += res.added
        refused += [
            {"line": part[r.index][0], "code": r.code, "message": r.message} for r in res.refused
        ]
    return added, refused


def cmd_add_batch(args: argparse.Namespace) -> int:
    owner = Credentials(args)
    if args.batch == "-":
        if not owner.uses_session:
            owner.prime()  # the password line comes first on stdin
        items = parse_batch(sys.stdin)
    else:
        try:
            with Path(args.batch).open(encoding="utf-8") as f:
                items = parse_batch(f)
        except OSError as exc:
            raise InvalidParameters(
                f"cannot read {args.batch}: {exc.strerror or exc}", data={"field": "--batch"}
            ) from exc
    with BrokerClient() as c:
        added, refused = send_batch(c, items, owner.creds(), atomic=args.atomic)
    if args.json:
        emit_json({"added": len(added), "ids": added, "refused": refused})
    else:
        info(f"added {len(added)} entr{'y' if len(added) == 1 else 'ies'}")
        for r in refused:
            info(f"line {r['line']}: {r['code']}: {r['message']}")
    return 0 if not refused else InvalidParameters.exit_code


def cmd_backup(args: argparse.Namespace) -> int:
    """The broker writes the copy into the vault's backups directory; this process (the
    person's) moves it to PATH, so the broker never writes where a caller points it."""
    owner = Credentials(args, owner_only=True)
    dest = Path(args.path).expanduser().absolute()
    if dest.exists():
        raise AlreadyExists(f"{dest} already exists", hint="name a new file")
    name = f"backup-{os.getpid()}-{secrets.token_hex(4)}.apm"
    with BrokerClient() as c:
        res = c.call("vault.backup", VaultBackupParams(name=name), **owner.creds())
    made = Path(res.path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out, made.open("rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
    except FileExistsError as exc:
        raise AlreadyExists(f"{dest} already exists", hint="name a new file") from exc
    except OSError as exc:
        raise StorageError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    finally:
        made.unlink(missing_ok=True)
    if args.json:
        emit_json({"path": str(dest), "size": res.size})
    else:
        info(f"backed up the vault to {dest} ({res.size} bytes, encrypted)")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    owner = Credentials(args, owner_only=True)
    with BrokerClient() as c:
        res = c.call("vault.migrate", VaultMigrateParams(finish=args.finish), **owner.creds())
    if args.json:
        emit_json(res)
        return 0
    info(f"vault format {res.format}, generation {res.generation}")
    for p in res.removed:
        info(f"deleted the v1 backup {p}")
    for p in res.v1_backups:
        info(f'kept the v1 backup {p} (run "apm vault migrate --finish" to delete it)')
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vault", help="vault storage: backup, migration")
    vsub = p.add_subparsers(dest="vault_cmd", required=True, metavar="COMMAND")

    b = vsub.add_parser(
        "backup",
        help="write a consistent copy of the vault to PATH (SQLite online backup)",
        description="Write a consistent, encrypted copy of the unlocked vault to PATH, while "
        "the broker keeps serving. The copy opens with the master password of the moment. "
        "To restore: stop the broker, move the vault file and its -wal/-shm files away, "
        "copy the backup to the vault path, start and unlock.",
    )
    b.add_argument("path", metavar="PATH", help="a new file (it must not exist)")
    _owner_opts(b)
    b.set_defaults(func=cmd_backup)

    m = vsub.add_parser(
        "migrate",
        help="show the vault format; --finish deletes the v1 backup a migration kept",
        description="A v1 vault is migrated to v2 (SQLite) when it is unlocked; the v1 file is "
        "kept beside it as <vault>.v1 for 30 days. --finish deletes it now.",
    )
    m.add_argument("--finish", action="store_true", help="delete the kept v1 backup now")
    _owner_opts(m)
    m.set_defaults(func=cmd_migrate)


def _owner_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
