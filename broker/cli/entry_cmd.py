"""`apm add|ls|search|show|get|edit|rm|totp`: working with entries through the broker.

Rules:
- Secret field values are prompted without echo or read with --from-stdin, --from-file or
  --editor; never from argv. Multi-line fields (keys, notes) are read until EOF (Ctrl-D).
- An ssh_key's private_key is parsed before it is sent; a broken key is refused.
- `get` writes the value to stdout and nothing else; messages go to stderr.
- `get` and `totp` with a session take oneshot's lean path; `cmd_get`/`cmd_totp` here are the
  full (pydantic) path, for the owner, and tests hold the two to the same behaviour.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import SecretStr

from broker.plugin_registry import entry_type
from broker.wire.entries import ENTRY_TYPE_NAMES, ENTRY_TYPES, EntryMeta
from broker.wire.errors import InvalidParameters
from broker.wire.protocol import (
    EntryAddParams,
    EntryEditParams,
    EntryGetParams,
    EntryListParams,
    EntryRef,
    EntrySearchParams,
    SecretValue,
)

from . import oneshot, storage_cmd
from .auth import Credentials
from .client import BrokerClient
from .generate_cmd import add_options as add_generate_options
from .generate_cmd import generated_secrets
from .output import ENTRY_HEADERS, emit_json, entry_details, entry_row, info, table
from .prompt import Input, read_file_value


def _kv(pairs: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidParameters(f"{what} must look like NAME=VALUE", data={"arg": key[:64]})
        out[key] = value
    return out


def _value_source(
    args: argparse.Namespace, owner: Credentials, target: str, required: bool = True
) -> SecretStr | None:
    """The one value --from-stdin, --from-file or --editor gives (None: none of them used)."""
    chosen = [
        flag
        for flag, used in (
            ("--from-stdin", args.from_stdin),
            ("--from-file", args.from_file),
            ("--editor", args.editor),
        )
        if used
    ]
    if len(chosen) > 1:
        raise InvalidParameters(
            f"{' and '.join(chosen)} both give a value; use one", hint="pick one way in"
        )
    if args.from_file:
        return read_file_value(target, args.from_file)
    if args.from_stdin:
        owner.prime()  # the password line comes first on stdin
        return owner.input.secret_from_stdin(target)
    if args.editor:
        owner.prime()  # asked before the editor takes the terminal
        from .editor import edit_secret

        return edit_secret(target, required)
    return None


def _check_values(type_: str, out: dict[str, SecretValue]) -> None:
    if type_ == "ssh_key" and "private_key" in out:
        from .ssh_keys import check_private_key

        check_private_key(out["private_key"].value.get_secret_value())


def _secrets(
    args: argparse.Namespace, owner: Credentials, type_: str, adding: bool
) -> dict[str, SecretValue]:
    if getattr(args, "generate", False):
        return generated_secrets(args, type_)
    out = _secret_values(args, owner, type_, adding)
    _check_values(type_, out)
    return out


def _secret_values(
    args: argparse.Namespace, owner: Credentials, type_: str, adding: bool
) -> dict[str, SecretValue]:
    spec = entry_type(type_)  # a plugin's type: loaded here too, to prompt for its secrets
    wanted = list(args.secret_field or [])
    wanted += [n for n in args.multiline or [] if n not in wanted]
    multiline = {f.name for f in spec.fields if f.multiline} | set(args.multiline or [])
    plain = set(_kv(args.field, "--field"))
    for f in spec.fields:
        if f.secret and f.name in plain:
            raise InvalidParameters(
                f"{f.name!r} is a secret field and cannot be given on the command line",
                hint="leave it out to be prompted, or use --from-stdin, --from-file or --editor",
            )
    if args.from_stdin or args.from_file or args.editor:
        target = wanted[0] if wanted else spec.primary
        if target is None:
            raise InvalidParameters("name the secret field with --secret-field F")
        value = _value_source(args, owner, target)
        return {target: SecretValue(value=value)} if value is not None else {}
    out: dict[str, SecretValue] = {}
    if adding:
        fields = [(f.name, f.required) for f in spec.fields if f.secret]
        fields += [(n, True) for n in wanted if n not in {f for f, _ in fields}]
    else:
        fields = [(n, True) for n in wanted]
    if fields and not Input.has_tty():
        missing = [n for n, required in fields if required]
        if missing:
            raise InvalidParameters(
                f"secret field {missing[0]!r} needs a value and there is no terminal",
                hint="pipe it in with --from-stdin, or use --from-file PATH",
            )
        return out
    owner.prime()
    for name, required in fields:
        if name in multiline:
            value = owner.input.secret_lines(name, required)
        else:
            value = owner.input.secret_prompt(name, required)
        if value is not None:
            out[name] = SecretValue(value=value)
    return out


def cmd_add(args: argparse.Namespace) -> int:
    if args.batch is not None:
        return storage_cmd.cmd_add_batch(args)
    if args.type is None or args.name is None:
        raise InvalidParameters("apm add needs TYPE and NAME", hint="or --batch FILE")
    owner = Credentials(args)
    params = EntryAddParams(
        type=args.type,
        name=args.name,
        space=args.space or "default",
        tags=args.tag or [],
        url=args.url,
        notes=args.notes,
        fields=_kv(args.field, "--field"),
        secrets=_secrets(args, owner, args.type, adding=True),
    )
    with BrokerClient() as c:
        res = c.call("entry.add", params, **owner.creds())
    if args.json:
        emit_json(res.entry)
    else:
        info(f"added {res.entry.type} {res.entry.name!r} to space {res.entry.space!r}")
    return 0


LS_PAGE = 1000  # entries per entry.list call (~0.5 MB); `apm ls` pages through them all


def cmd_ls(args: argparse.Namespace) -> int:
    owner = Credentials(args)
    entries: list[EntryMeta] = []
    with BrokerClient() as c:
        while True:  # every entry, not only the broker's first page
            res = c.call(
                "entry.list",
                EntryListParams(
                    space=args.space,
                    type=args.type,
                    tag=args.tag,
                    offset=len(entries),
                    limit=LS_PAGE,
                ),
                **owner.creds(),
            )
            entries.extend(res.entries)
            if not res.entries or len(entries) >= res.total:
                break
    if args.json:
        emit_json(entries)
    elif entries:
        table(ENTRY_HEADERS, [entry_row(e) for e in entries])
    else:
        info('no entries; add one with "apm add TYPE NAME"')
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    owner = Credentials(args)
    with BrokerClient() as c:
        res = c.call(
            "entry.search",
            EntrySearchParams(query=args.query, space=args.space, type=args.type, limit=args.limit),
            **owner.creds(),
        )
    if args.json:
        emit_json(res.hits)
    elif res.hits:
        table(ENTRY_HEADERS, [entry_row(h.entry) for h in res.hits])
    else:
        info("no matches")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    owner = Credentials(args)
    with BrokerClient() as c:
        res = c.call("entry.show", EntryRef(ref=args.name, space=args.space), **owner.creds())
    if args.json:
        emit_json(res.entry)
    else:
        entry_details(res.entry)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    owner = Credentials(args)
    with BrokerClient() as c:
        res = c.call(
            "entry.get",
            EntryGetParams(ref=args.name, space=args.space, field=args.field),
            **owner.creds(),
        )
    if args.clip:
        from .clipboard import copy_and_schedule_clear

        copy_and_schedule_clear(res.value.get_secret_value(), args.clear_after)
        return 0
    sys.stdout.write(res.value.get_secret_value() + ("" if args.no_newline else "\n"))
    sys.stdout.flush()
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    owner = Credentials(args)
    with BrokerClient() as c:
        meta = c.call("entry.show", EntryRef(ref=args.name, space=args.space), **owner.creds())
        params = EntryEditParams(
            ref=meta.entry.id,
            expect_updated_at=meta.entry.updated_at,
            new_name=args.rename,
            move_to=args.move_to,
            add_tags=args.tag or [],
            remove_tags=args.untag or [],
            url=args.url,
            notes=args.notes,
            fields=_kv(args.field, "--field"),
            secrets=_secrets(args, owner, meta.entry.type, adding=False),
            remove_fields=args.remove_field or [],
        )
        res = c.call("entry.edit", params, **owner.creds())
    if args.json:
        emit_json(res.entry)
    else:
        info(f"updated {res.entry.name!r}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    owner = Credentials(args)
    with BrokerClient() as c:
        res = c.call("entry.remove", EntryRef(ref=args.name, space=args.space), **owner.creds())
    if args.json:
        emit_json(res)
    else:
        info(f"removed {res.name!r}")
    return 0


def cmd_totp(args: argparse.Namespace) -> int:
    owner = Credentials(args)
    with BrokerClient() as c:
        res = c.call("entry.totp", EntryRef(ref=args.name, space=args.space), **owner.creds())
    if args.json:
        emit_json(res)
    else:
        sys.stdout.write(res.code + "\n")
        info(f"valid for {res.remaining} more seconds")
    return 0


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _secret_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--secret-field",
        action="append",
        metavar="F",
        help="a secret field to set (prompted without echo, or read by --from-stdin)",
    )
    p.add_argument(
        "--multiline",
        action="append",
        metavar="F",
        help="secret field F is multi-line: read at the prompt until Ctrl-D (ssh_key "
        "private_key and note content always are)",
    )
    p.add_argument(
        "--from-stdin",
        action="store_true",
        help="read the secret value from stdin (after the password line with --password-stdin)",
    )
    p.add_argument(
        "--from-file",
        metavar="PATH",
        help="read the secret value from a file (e.g. a private key); one trailing newline "
        "is dropped",
    )
    p.add_argument(
        "--editor",
        action="store_true",
        help="write the secret value in $VISUAL/$EDITOR (a 0600 file in a private directory, "
        "removed afterwards)",
    )


class TypeNames(tuple[str, ...]):
    """argparse choices for an entry type: iterating gives the built-ins (help, completion,
    "did you mean"); `in` also accepts an installed entry_type plugin's type, enabled or not
    (whether it may be used is the broker's answer)."""

    def __contains__(self, value: object) -> bool:
        if tuple.__contains__(self, value):
            return True
        if not isinstance(value, str) or not value:
            return False
        from broker.plugin_registry import discover

        return any(p.name == f"entry_type.{value}" for p in discover())


TYPES = TypeNames(ENTRY_TYPE_NAMES)
_TYPES = ", ".join(ENTRY_TYPE_NAMES) + ", or a plugin's"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    types = ", ".join(
        f"{t} ({', '.join(f.name + ('*' if f.secret else '') for f in ENTRY_TYPES[t].fields)})"
        for t in ENTRY_TYPE_NAMES
    )
    p = sub.add_parser(
        "add",
        help="add an entry",
        description=f"Add an entry. Types and fields (* = secret): {types}; custom takes any "
        "field names; enabled entry_type plugins add more (apm plugin ls). Secret fields are "
        "prompted for without echo, or read with --from-stdin.",
    )
    p.add_argument(
        "type",
        choices=TYPES,
        metavar="TYPE",
        nargs="?",
        help="the entry type (above, or a plugin's)",
    )
    p.add_argument(
        "name", metavar="NAME", nargs="?", help="the entry's name, unique within its space"
    )
    p.add_argument("--space", help="space to add it to (default: default)")
    p.add_argument("--field", action="append", metavar="K=V", help="a non-secret field")
    p.add_argument("--tag", action="append", metavar="T", help="a tag (repeatable)")
    p.add_argument("--url", help="the site or service it belongs to")
    p.add_argument("--notes", help="non-secret notes (use a note entry for secret text)")
    _secret_opts(p)
    p.add_argument(
        "--generate",
        action="store_true",
        help="fill the main secret field (or --secret-field F) with a generated password",
    )
    add_generate_options(p)
    storage_cmd.add_batch_options(p)
    _common(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("ls", help="list entries (metadata only)")
    p.add_argument("--space", help="only entries in this space")
    p.add_argument(
        "--type", choices=TYPES, metavar="TYPE", help="only entries of this type (" + _TYPES + ")"
    )
    p.add_argument("--tag", help="only entries with this tag")
    _common(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("search", help="fuzzy search over names, usernames, urls, tags, notes")
    p.add_argument("query", help="words to look for (typos are forgiven)")
    p.add_argument("--space", help="only entries in this space")
    p.add_argument(
        "--type", choices=TYPES, metavar="TYPE", help="only entries of this type (" + _TYPES + ")"
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many hits (default 50)")
    _common(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("show", help="show an entry's metadata (never its secrets)")
    p.add_argument("name", help="entry name or id")
    p.add_argument("--space", help="the space the entry is in (needed if the name is in several)")
    _common(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("get", help=oneshot.GET_HELP)
    oneshot.get_arguments(p)  # one definition for the lean path and this one
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("edit", help="change an entry; --secret-field F sets a new secret value")
    p.add_argument("name", help="entry name or id")
    p.add_argument("--space", help="the space the entry is in")
    p.add_argument("--rename", metavar="NEW_NAME", help="give the entry a new name")
    p.add_argument("--move-to", metavar="SPACE", help="move the entry to another space")
    p.add_argument("--field", action="append", metavar="K=V", help="set a non-secret field")
    p.add_argument("--remove-field", action="append", metavar="F", help="remove a field")
    p.add_argument("--tag", action="append", metavar="T", help="add a tag")
    p.add_argument("--untag", action="append", metavar="T", help="remove a tag")
    p.add_argument("--url", help="set the url")
    p.add_argument("--notes", help="set the non-secret notes")
    _secret_opts(p)
    _common(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("rm", help="remove an entry")
    p.add_argument("name", help="entry name or id")
    p.add_argument("--space", help="the space the entry is in (needed if the name is in several)")
    _common(p)
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("totp", help=oneshot.TOTP_HELP)
    oneshot.totp_arguments(p)
    p.set_defaults(func=cmd_totp)
