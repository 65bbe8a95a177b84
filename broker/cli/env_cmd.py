"""`apm env scan [DIR]` and `apm env migrate FILE`: secrets out of .env files, references in.

`scan` lists .env-style files with secret-looking values (file, line, key, kind). `migrate`
imports each such value as an `api_key` entry, checks through the broker that every new
reference resolves to the original value, keeps a 0600 backup of the file, and rewrites the
file with `KEY=apm://space/name/key` in place of each value, so `apm run --env-file FILE`
gives a program the same environment as before while the file itself holds no secret.

Rules:
- No value is ever printed; only file, line, key, kind and entry names.
- The file is rewritten only after every reference was verified, atomically, keeping its mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from broker.wire.errors import InternalError, InvalidParameters

from .output import info, table

# the rest is imported inside the commands: `apm` start-up stays lean for every other command

FIELD = "key"
RESOLVE_CHUNK = 64


def cmd_scan(args: argparse.Namespace) -> int:
    from .env_scan import env_files, read_small, scan_text

    root = Path(args.dir)
    if not root.exists():
        raise InvalidParameters(f"no such file or directory: {args.dir}")
    findings = []
    for path in env_files(root):
        text = read_small(path)
        if text is not None:
            findings += scan_text(path, text)
    if args.json:
        rows = [
            {"file": str(f.path), "line": f.line, "key": f.key, "kind": f.kind} for f in findings
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif findings:
        table(
            ("FILE", "LINE", "KEY", "KIND"),
            [[str(f.path), str(f.line), f.key, f.kind] for f in findings],
        )
        info(f'{len(findings)} secret-looking values; move them with "apm env migrate FILE"')
    else:
        info("no secret-looking values found")
    return 1 if findings and args.check else 0


def _prefix(path: Path, given: str | None) -> str:
    base = given if given is not None else (path.resolve().parent.name or "env") + "-"
    return re.sub(r"[/\s]", "_", base)


def _reference(space: str, name: str) -> str:
    ref = f"apm://{space}/{name}/{FIELD}"
    return f'"{ref}"' if " " in ref else ref


def _write_backup(path: Path, data: bytes) -> Path:
    backup = path.with_name(path.name + ".apm-backup")
    n = 1
    while True:
        try:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            break
        except FileExistsError:
            n += 1
            backup = path.with_name(f"{path.name}.apm-backup.{n}")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return backup


def _replace_file(path: Path, text: str) -> None:
    import tempfile

    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def cmd_migrate(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from broker.wire.entries import NAME_MAX
    from broker.wire.protocol import EntryAddParams, SecretResolveParams, SecretValue

    from .auth import Credentials
    from .batch import commit_entries, print_summary
    from .client import BrokerClient
    from .env_scan import classify, parse_lines

    path = Path(args.file)
    if path.is_symlink():
        raise InvalidParameters(
            f"{args.file} is a symbolic link", hint="migrate the file it points to instead"
        )
    if not path.is_file():
        raise InvalidParameters(f"no such file: {args.file}")
    raw = path.read_bytes()
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise InvalidParameters(f"{args.file} is not UTF-8 text") from exc
    prefix = _prefix(path, args.prefix)
    space = args.space or "default"
    found = [(ln, kind) for ln in parse_lines(text) if (kind := classify(ln.key, ln.value))]
    if not found:
        info(f"no secret-looking values in {path}; nothing to do")
        return 0
    items = [
        EntryAddParams(
            type="api_key",
            name=(prefix + ln.key)[:NAME_MAX],
            space=space,
            tags=["env"],
            notes=f"migrated from {path.name} ({ln.key}, {kind})",
            fields={"service": ln.key},
            secrets={FIELD: SecretValue(value=SecretStr(ln.value))},
        )
        for ln, kind in found
    ]
    if args.dry_run:
        table(
            ("LINE", "KEY", "KIND", "ENTRY"),
            [
                [str(ln.number), ln.key, kind, f"{space}/{p.name}"]
                for (ln, kind), p in zip(found, items, strict=True)
            ],
        )
        info(f"dry run: {len(items)} values would move into space {space!r}")
        return 0
    who = Credentials(args)
    with BrokerClient() as c:
        creds = who.creds()
        summary = commit_entries(c, creds, items, args.on_duplicate, label="migrating")
        renamed = dict(summary.renamed)
        stored = set(summary.added) | set(renamed.values()) | set(summary.overwritten)
        refs: dict[int, tuple[str, str]] = {}  # line number -> (ref, original)
        for (ln, _), p in zip(found, items, strict=True):
            name = renamed.get(p.name, p.name)
            if name in stored:
                refs[ln.number] = (f"apm://{space}/{name}/{FIELD}", ln.value)
        resolved: dict[str, str] = {}
        wanted = sorted({r for r, _ in refs.values()})
        for i in range(0, len(wanted), RESOLVE_CHUNK):
            res = c.call(
                "secret.resolve", SecretResolveParams(refs=wanted[i : i + RESOLVE_CHUNK]), **creds
            )
            resolved.update({s.ref: s.value.get_secret_value() for s in res.secrets})
    bad = [n for n, (ref, original) in refs.items() if resolved.get(ref) != original]
    if bad:
        raise InternalError(
            "a stored value does not read back as the original; the file was not changed",
            hint="check the entries with apm show, then run migrate again",
            data={"lines": bad[:20]},
        )
    out_lines = text.splitlines(keepends=True)
    for n, (ref, _) in refs.items():
        ln = next(x for x, _ in found if x.number == n)
        ending = "\n" if out_lines[n - 1].endswith("\n") else ""
        space_, name = ref[len("apm://") :].split("/")[:2]
        out_lines[n - 1] = (
            f"{'export ' if ln.exported else ''}{ln.key}={_reference(space_, name)}{ending}"
        )
    backup = _write_backup(path, raw)
    _replace_file(path, "".join(out_lines))
    print_summary(summary)
    info(f"rewrote {path} with {len(refs)} apm:// references")
    info(f"backup of the original (it holds the plaintext values): {backup} (mode 0600)")
    info(f'run your program with "apm run --env-file {path} -- COMMAND"; delete the backup after')
    return 0 if not summary.failed else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("env", help="find secrets in .env files and move them into apm")
    esub = p.add_subparsers(dest="env_command", required=True, metavar="SUBCOMMAND")
    s = esub.add_parser(
        "scan",
        help="list .env files with secret-looking values (never the values)",
        description="Find .env-style files (.env, .env.*, *.env) under DIR with values that "
        "look like secrets, by known token formats, key names and entropy. Prints file, line, "
        "key and kind; never a value.",
    )
    s.add_argument(
        "dir", nargs="?", default=".", metavar="DIR", help="where to look (default: here)"
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--check", action="store_true", help="exit 1 when anything is found")
    s.set_defaults(func=cmd_scan)
    m = esub.add_parser(
        "migrate",
        help="import a .env file's secrets and rewrite it with apm:// references",
        description="Import each secret-looking value of FILE as an api_key entry, verify "
        "every reference resolves to the original, keep FILE.apm-backup (0600), and rewrite "
        "FILE with KEY=apm://SPACE/NAME/key. Use it with apm run --env-file FILE -- CMD.",
    )
    m.add_argument("file", metavar="FILE", help="the .env file to rewrite with references")
    m.add_argument("--space", help="space for the new entries (default: default; created)")
    m.add_argument("--prefix", help="entry name prefix (default: the directory's name and -)")
    m.add_argument(
        "--on-duplicate",
        choices=("skip", "rename", "overwrite"),
        default="rename",
        help="when an entry with that name exists (default rename)",
    )
    m.add_argument("--dry-run", action="store_true", help="show what would move; change nothing")
    m.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    m.set_defaults(func=cmd_migrate)
