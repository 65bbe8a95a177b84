"""`apm import`: each format read from a real file in that tool's format, mapped onto apm's
entry types, committed through the bulk path, summarised without a secret."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from broker.cli.importers import (
    ImportContext,
    Loaded,
    browser_csv,
    build,
    envfile,
    keepass,
    onepassword,
    pass_store,
)
from broker.cli.importers import bitwarden as bw
from broker.wire.errors import BadPassword, InvalidParameters
from broker.wire.protocol import EntryAddParams

from . import import_fixtures as fx
from .conftest import PASSWORD, Apm, Broker, register_secret

CTX = ImportContext(source_password=lambda label: SecretStr(fx.SOURCE_PASSWORD))


def _by_name(params: list[EntryAddParams]) -> dict[str, EntryAddParams]:
    return {p.name: p for p in params}


def _secret(p: EntryAddParams, field: str) -> str:
    return p.secrets[field].value.get_secret_value()


def _build(loaded: Loaded, fmt: str) -> tuple[dict[str, EntryAddParams], list[tuple[str, str]]]:
    params, failed = build(loaded, "default", fmt)
    return _by_name(params), failed


# ---------------------------------------------------------------- mapping, per format


@pytest.fixture(scope="module")
def kdbx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One KDBX4 per module: creating one with pykeepass's default Argon2 takes seconds."""
    db = tmp_path_factory.mktemp("kdbx") / "db.kdbx"
    fx.make_kdbx(db)
    return db


def test_keepass_kdbx4_maps_logins_totp_custom_fields_groups_and_skips_the_recycle_bin(
    kdbx: Path,
) -> None:
    db = kdbx
    got, failed = _build(keepass.load(db, CTX), "keepass")
    assert failed == []
    gh = got["GitHub"]
    assert gh.type == "login" and gh.fields == {"username": "alice"}
    assert _secret(gh, "password") == "kp-gh-s3cret"
    assert gh.url == "https://github.com"
    assert "Work" in gh.tags and "from-keepass" in gh.tags
    assert got["GitHub (totp)"].type == "totp"
    assert _secret(got["GitHub (totp)"], "secret") == fx.OTPAUTH
    extra = got["GitHub (fields)"]
    assert extra.type == "custom"
    assert _secret(extra, "API_token") == "kp-api-t0ken"  # protected -> secret
    assert extra.fields == {"Team": "platform"}  # unprotected -> plain
    assert _secret(extra, "notes") == "recovery: kp-r3c0very"  # notes -> a secret field
    db01 = got["db01 (totp)"]
    assert "secret=" + fx.SEED in _secret(db01, "secret")  # KeePass 2 native TimeOtp-*
    assert "Work/Servers" in got["db01"].tags
    assert set(got["Wifi"].tags) >= {"home", "net"}
    assert not any(n.startswith("Old") for n in got)


KDBX31 = Path(__file__).parent / "fixtures" / "kdbx3" / "db31.kdbx"


def test_keepass_kdbx31_file_maps_like_kdbx4() -> None:
    """A real KDBX 3.1 file (AES-KDF, its own header and inner stream cipher): see its README."""
    from pykeepass import PyKeePass

    assert PyKeePass(str(KDBX31), password=fx.SOURCE_PASSWORD).version == (3, 1)
    got, failed = _build(keepass.load(KDBX31, CTX), "keepass")
    assert failed == []
    gh = got["GitHub"]
    assert gh.type == "login" and gh.fields == {"username": "alice"}
    assert _secret(gh, "password") == "kp-gh-s3cret"
    assert "Work" in gh.tags and "from-keepass" in gh.tags
    assert _secret(got["GitHub (totp)"], "secret") == fx.OTPAUTH
    extra = got["GitHub (fields)"]
    assert _secret(extra, "API_token") == "kp-api-t0ken"  # protected in the inner stream
    assert extra.fields == {"Team": "platform"}
    assert "secret=" + fx.SEED in _secret(got["db01 (totp)"], "secret")
    assert "Work/Servers" in got["db01"].tags
    assert set(got["Wifi"].tags) >= {"home", "net"}
    assert not any(n.startswith("Old") for n in got)
    with pytest.raises(BadPassword):
        keepass.load(KDBX31, ImportContext(source_password=lambda label: SecretStr("nope")))


def test_keepass_wrong_password_is_bad_password_and_garbage_is_invalid(
    kdbx: Path, tmp_path: Path
) -> None:
    db = kdbx
    wrong = ImportContext(source_password=lambda label: SecretStr("nope"))
    with pytest.raises(BadPassword):
        keepass.load(db, wrong)
    junk = tmp_path / "junk.kdbx"
    junk.write_bytes(b"not a database at all")
    with pytest.raises(InvalidParameters):
        keepass.load(junk, CTX)


def test_without_the_keepass_extra_the_importer_says_how_to_install_it(
    kdbx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pykeepass is GPL-3.0, so it is the opt-in `keepass` extra, not a default dependency
    for name in [m for m in sys.modules if m == "pykeepass" or m.startswith("pykeepass.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pykeepass", None)  # import pykeepass -> ImportError
    with pytest.raises(InvalidParameters) as caught:
        keepass.load(kdbx, CTX)
    assert "pykeepass" in str(caught.value)
    assert "apm-broker[keepass]" in (caught.value.hint or "")


def test_keepass_with_a_key_file(tmp_path: Path) -> None:
    from pykeepass import create_database

    keyfile = tmp_path / "db.key"
    keyfile.write_bytes(os.urandom(64))
    db = tmp_path / "kf.kdbx"
    kp = create_database(str(db), password=None, keyfile=str(keyfile))
    kp.add_entry(kp.root_group, "Mail", "me", "kf-s3cret")
    fx.cheap_argon2(kp)
    kp.save()
    no_pw = ImportContext(source_password=lambda label: SecretStr(""), keyfile=keyfile)
    got, _ = _build(keepass.load(db, no_pw), "keepass")
    assert _secret(got["Mail"], "password") == "kf-s3cret"
    with pytest.raises(BadPassword):
        keepass.load(db, CTX)  # the password alone does not open it
    missing = ImportContext(source_password=CTX.source_password, keyfile=tmp_path / "nope")
    with pytest.raises(InvalidParameters):
        keepass.load(db, missing)


def _bw_check(got: dict[str, EntryAddParams]) -> None:
    ex = got["Example"]
    assert ex.type == "login" and ex.fields == {"username": "alice@example.com"}
    assert _secret(ex, "password") == "bw-ex-s3cret"
    assert ex.url == "https://example.com/login"
    assert "Personal" in ex.tags
    assert _secret(got["Example (totp)"], "secret") == fx.OTPAUTH
    fields = got["Example (fields)"]
    assert _secret(fields, "pin") == "bw-p1n-4242" and fields.fields == {"region": "eu"}
    assert _secret(fields, "notes") == "bw-n0tes-secret"
    note = got["Recovery codes"]
    assert note.type == "note" and _secret(note, "content") == "bw-code-1 bw-code-2"
    card = got["Visa"]
    assert card.type == "custom" and _secret(card, "number") == "4111111111111111"
    assert card.fields["brand"] == "Visa"
    ssh = got["deploy key"]
    assert ssh.type == "ssh_key" and "bw-ssh-k3y" in _secret(ssh, "private_key")
    assert ssh.fields == {"public_key": "ssh-ed25519 AAAAC3Nza deploy"}
    assert "deleted" not in got


def test_bitwarden_plain_json_export(tmp_path: Path) -> None:
    f = tmp_path / "bw.json"
    f.write_text(json.dumps(fx.bitwarden_plain()))
    got, failed = _build(bw.load(f, CTX), "bitwarden")
    assert failed == []
    _bw_check(got)


@pytest.mark.parametrize("kdf", [0, 1], ids=["pbkdf2", "argon2id"])
def test_bitwarden_password_protected_export_decrypts_per_the_documented_scheme(
    tmp_path: Path, kdf: int
) -> None:
    f = tmp_path / "bw.json"
    f.write_text(json.dumps(fx.bitwarden_encrypted(fx.bitwarden_plain(), kdf=kdf)))
    got, _ = _build(bw.load(f, CTX), "bitwarden")
    _bw_check(got)
    wrong = ImportContext(source_password=lambda label: SecretStr("wrong"))
    with pytest.raises(BadPassword) as err:
        bw.load(f, wrong)
    assert err.value.code == "BAD_PASSWORD"


def test_bitwarden_tampered_or_hostile_exports_are_refused(tmp_path: Path) -> None:
    doc = fx.bitwarden_encrypted(fx.bitwarden_plain())
    f = tmp_path / "bw.json"
    ver, rest = doc["data"].split(".", 1)
    iv, ct, mac = rest.split("|")
    flipped = bytearray(__import__("base64").b64decode(ct))
    flipped[0] ^= 1
    doc["data"] = f"{ver}.{iv}|{__import__('base64').b64encode(bytes(flipped)).decode()}|{mac}"
    f.write_text(json.dumps(doc))
    with pytest.raises(BadPassword):  # the MAC catches it before any decryption
        bw.load(f, CTX)
    for bad in ({"kdfIterations": 1}, {"kdfType": 1, "kdfMemory": 1 << 20}, {"kdfType": 7}):
        hostile = {**fx.bitwarden_encrypted({"items": []}), **bad}
        f.write_text(json.dumps(hostile))
        with pytest.raises(InvalidParameters):
            bw.load(f, CTX)
    f.write_text(json.dumps({"encrypted": True, "encKeyValidation_DO_NOT_EDIT": "2.a|b|c"}))
    with pytest.raises(InvalidParameters) as err:
        bw.load(f, CTX)
    assert "account-restricted" in err.value.message


def test_1password_1pux_archive(tmp_path: Path) -> None:
    f = tmp_path / "export.1pux"
    fx.make_1pux(f)
    got, failed = _build(onepassword.load_1pux(f, CTX), "1password")
    assert failed == []
    gl = got["GitLab"]
    assert gl.type == "login" and _secret(gl, "password") == "op-gl-s3cret"
    assert gl.fields == {"username": "alice"} and set(gl.tags) >= {"Private", "dev"}
    assert _secret(got["GitLab (totp)"], "secret") == fx.OTPAUTH
    extra = got["GitLab (fields)"]
    assert _secret(extra, "backup_pin") == "op-p1n-77" and extra.fields == {"team": "infra"}
    api = got["Stripe API"]
    assert api.type == "api_key" and _secret(api, "key") == "op-api-k3y"
    assert got["Safe note"].type == "note"
    assert "Archived one" not in got
    bad = tmp_path / "bad.1pux"
    bad.write_bytes(b"PK not really")
    with pytest.raises(InvalidParameters):
        onepassword.load_1pux(bad, CTX)


def test_1password_csv_and_browser_csvs(tmp_path: Path) -> None:
    f = tmp_path / "op.csv"
    f.write_text(fx.ONEPASSWORD_CSV)
    got, _ = _build(onepassword.load_csv(f, CTX), "1password-csv")
    assert _secret(got["Example"], "password") == "op-csv-s3cret"
    assert _secret(got["Example (totp)"], "secret") == fx.OTPAUTH
    assert set(got["Example"].tags) >= {"a", "b"}
    assert "Old" not in got
    chrome = tmp_path / "chrome.csv"
    chrome.write_text(fx.CHROME_CSV)
    got, failed = _build(browser_csv.load(chrome, CTX), "browser-csv")
    assert _secret(got["example.com (alice)"], "password") == "chr-s3cret-1"
    assert _secret(got["example.com (bob)"], "password") == "chr-s3cret-2"
    assert [n for n, _ in failed] == ["nopass"]
    firefox = tmp_path / "firefox.csv"
    firefox.write_text(fx.FIREFOX_CSV)
    got, _ = _build(browser_csv.load(firefox, CTX), "browser-csv")
    ff = got["accounts.example.org"]
    assert ff.fields == {"username": "dave"} and _secret(ff, "password") == "ffx-s3cret-1"
    with pytest.raises(InvalidParameters):
        browser_csv.load(f, CTX)  # 1Password's CSV is not a browser CSV
    huge = tmp_path / "huge.csv"
    huge.write_text('url,username,password\nhttps://x,"' + "a" * 200_000 + '",pw\n')
    with pytest.raises(InvalidParameters):
        browser_csv.load(huge, CTX)


def test_a_totp_apm_cannot_read_is_kept_as_a_secret_field_not_dropped(tmp_path: Path) -> None:
    doc = fx.bitwarden_plain()
    doc["items"][0]["login"]["totp"] = "steam://ABCDEFGH"
    f = tmp_path / "bw.json"
    f.write_text(json.dumps(doc))
    got, _ = _build(bw.load(f, CTX), "bitwarden")
    assert "Example (totp)" not in got
    assert _secret(got["Example (fields)"], "totp") == "steam://ABCDEFGH"
    rec = pass_store.parse("x", None, "pw\notpauth://hotp/x?secret=ABC&counter=1\n")
    assert rec.totp is None and rec.notes == "otpauth://hotp/x?secret=ABC&counter=1"


def test_env_file_import(tmp_path: Path) -> None:
    f = tmp_path / ".env"
    f.write_text("A_TOKEN=ghp_" + "x" * 36 + "\nEMPTY=\nREF=apm://default/x/key\n")
    got, _ = _build(envfile.load(f, CTX), "env")
    assert list(got) == ["A_TOKEN"] and got["A_TOKEN"].type == "api_key"


@pytest.fixture
def pass_store_dir(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    store, home = tmp_path / "store", tmp_path / "gnupg"
    files = fx.make_pass_store(store, home)
    try:
        yield store, home, files
    finally:
        fx.stop_gpg_agent(home)


def test_pass_store_decrypted_with_gpg(
    pass_store_dir: tuple[Path, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, gnupghome, _ = pass_store_dir
    monkeypatch.setenv("GNUPGHOME", str(gnupghome))
    got, failed = _build(pass_store.load(store, CTX), "pass")
    assert failed == []
    fm = got["fastmail (email)"]
    assert fm.fields == {"username": "alice@fastmail.com"} and fm.url == "https://fastmail.com"
    assert _secret(fm, "password") == "pass-fm-s3cret"
    assert _secret(got["fastmail (email) (totp)"], "secret") == fx.OTPAUTH
    assert _secret(got["fastmail (web)"], "password") == "pass-web-s3cret"
    vpn = got["vpn"]
    assert vpn.fields == {"username": "alice"} and "work" in vpn.tags
    assert _secret(got["vpn (fields)"], "notes") == "second line of notes"
    monkeypatch.setenv("GNUPGHOME", str(store))  # no key there: each file fails alone
    loaded = pass_store.load(store, CTX)
    assert loaded.records == [] and len(loaded.failed) == 3


# ---------------------------------------------------------------- through the real CLI


def _import(apm: Apm, *args: str, source: str | None = None) -> Any:
    stdin = (fx.SOURCE_PASSWORD + "\n") if source is None else source
    extra = ("--source-password-stdin",)
    proc = apm("import", *args, *extra, "--json", "--password-stdin", stdin=PASSWORD + "\n" + stdin)
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout), proc


def _no_secret_in(text: str) -> None:
    for s in ("kp-gh-s3cret", "kp-api-t0ken", "bw-ex-s3cret", "bw-p1n-4242", "op-gl-s3cret",
              "pass-fm-s3cret", fx.SEED, fx.SOURCE_PASSWORD):  # fmt: skip
        assert s not in text


@pytest.mark.slow
def test_import_a_kdbx31_file_through_the_broker(vault: Broker, apm: Apm) -> None:
    for s in ("kp-gh-s3cret", "kp-api-t0ken", "kp-db-s3cret", "kp-wifi-s3cret", "kp-r3c0very"):
        register_secret(s)
    summary, proc = _import(apm, "keepass", str(KDBX31), "--space", "default")
    _no_secret_in(proc.stdout + proc.stderr)
    assert summary["failed"] == []
    assert set(summary["added"]) >= {"GitHub", "GitHub (totp)", "GitHub (fields)", "db01", "Wifi"}
    assert apm.ok("get", "db01").stdout == "kp-db-s3cret\n"
    code = apm.ok("totp", "db01 (totp)").stdout.strip()
    assert code.isdigit() and len(code) == 6


@pytest.mark.slow
def test_import_keepass_through_the_broker_then_get_and_totp_work(
    vault: Broker, apm: Apm, kdbx: Path
) -> None:
    for s in ("kp-gh-s3cret", "kp-api-t0ken", "kp-db-s3cret", "kp-wifi-s3cret", "kp-r3c0very"):
        register_secret(s)
    db = kdbx
    dry = apm("import", "keepass", str(db), "--dry-run", "--source-password-stdin",
              stdin=fx.SOURCE_PASSWORD + "\n")  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert json.loads(apm.ok("ls", "--json").stdout) == []
    summary, proc = _import(apm, "keepass", str(db), "--space", "kp")
    _no_secret_in(proc.stdout + proc.stderr + dry.stdout + dry.stderr)
    assert summary["failed"] == []
    assert set(summary["added"]) >= {"GitHub", "GitHub (totp)", "GitHub (fields)", "db01", "Wifi"}
    assert apm.ok("get", "GitHub", "--space", "kp").stdout == "kp-gh-s3cret\n"
    assert apm.ok("get", "GitHub (fields)", "--space", "kp", "--field", "API_token").stdout == (
        "kp-api-t0ken\n"
    )
    code = apm.ok("totp", "GitHub (totp)", "--space", "kp").stdout.strip()
    assert code.isdigit() and len(code) == 6
    # again: everything is a duplicate now
    summary, _ = _import(apm, "keepass", str(db), "--space", "kp")
    assert summary["added"] == [] and len(summary["skipped"]) >= 5
    summary, _ = _import(apm, "keepass", str(db), "--space", "kp", "--on-duplicate", "rename")
    assert {"from": "GitHub", "to": "GitHub (2)"} in summary["renamed"]
    assert apm.ok("get", "GitHub (2)", "--space", "kp").stdout == "kp-gh-s3cret\n"
    summary, _ = _import(apm, "keepass", str(db), "--space", "kp", "--on-duplicate", "overwrite")
    assert "GitHub" in summary["overwritten"]
    shown = json.loads(apm.ok("show", "GitHub", "--space", "kp", "--json").stdout)
    assert shown["fields"]["password"]["history"] == 1


@pytest.mark.slow
def test_import_encrypted_bitwarden_1pux_and_pass_through_the_cli(
    vault: Broker,
    apm: Apm,
    tmp_path: Path,
    pass_store_dir: tuple[Path, Path, dict[str, str]],
) -> None:
    for s in ("bw-ex-s3cret", "bw-p1n-4242", "op-gl-s3cret", "op-p1n-77", "pass-fm-s3cret"):
        register_secret(s)
    f = tmp_path / "bw.json"
    f.write_text(json.dumps(fx.bitwarden_encrypted(fx.bitwarden_plain(), kdf=1)))
    proc = apm(
        "import", "bitwarden", str(f), "--source-password-stdin", "--password-stdin",
        stdin=PASSWORD + "\nbad-export-pw-7\n",
    )  # fmt: skip
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    assert json.loads(apm.ok("ls", "--json").stdout) == []
    summary, proc = _import(apm, "bitwarden", str(f))
    _no_secret_in(proc.stdout + proc.stderr)
    assert "Example (totp)" in summary["added"]
    assert apm.ok("get", "Example").stdout == "bw-ex-s3cret\n"

    pux = tmp_path / "x.1pux"
    fx.make_1pux(pux)
    summary, proc = _import(apm, "1password", str(pux), "--space", "op", source="")
    _no_secret_in(proc.stdout + proc.stderr)
    assert apm.ok("get", "GitLab", "--space", "op").stdout == "op-gl-s3cret\n"

    store, gnupghome, _ = pass_store_dir
    apm.env["GNUPGHOME"] = str(gnupghome)
    summary, proc = _import(apm, "pass", str(store), "--space", "pass", source="")
    _no_secret_in(proc.stdout + proc.stderr)
    assert summary["failed"] == []
    assert apm.ok("get", "fastmail (email)", "--space", "pass").stdout == "pass-fm-s3cret\n"


def test_import_refuses_unknown_formats_and_missing_files_with_codes(apm: Apm) -> None:
    bad = apm("import", "lastpass", "/nonexistent", "--dry-run")
    assert bad.returncode == 10 and "unknown import format" in bad.stderr
    assert "keepass" in bad.stderr  # the hint lists the formats
    missing = apm("import", "keepass", "/nonexistent/db.kdbx", "--dry-run")
    assert missing.returncode == 10 and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_a_big_import_shows_a_progress_bar_on_a_terminal_only(
    vault: Broker, apm: Apm, tmp_path: Path
) -> None:
    import pty
    import subprocess
    import sys
    import threading

    from .conftest import clean_env

    big = tmp_path / "big.env"
    big.write_text("".join(f"KEY_{i}=value-number-{i}\n" for i in range(120)))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli.main", "import", "env", str(big), "--password-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=clean_env(apm.home),
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # read the terminal while the child writes (its buffer is small)
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    proc.communicate(PASSWORD.encode() + b"\n", timeout=120)
    reader.join(timeout=30)
    os.close(master)
    seen = b"".join(chunks)
    assert proc.returncode == 0, seen
    assert b"\rimporting [" in seen and b"120/120" in seen
    assert b"added 120" in seen
    piped = apm("import", "env", str(big), "--space", "other", password=PASSWORD)
    assert piped.returncode == 0
    assert "importing [" not in piped.stderr and "added 120" in piped.stderr
