"""Real files in each tool's export format, written the way the tool writes them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import zipfile
from pathlib import Path
from typing import Any

SEED = "JBSWY3DPEHPK3PXPJBSWY3DP"
OTPAUTH = f"otpauth://totp/Example:alice@example.com?secret={SEED}&issuer=Example"
SOURCE_PASSWORD = "export pass phrase 9"


# ---------------------------------------------------------------- KeePass (pykeepass)


def make_kdbx(path: Path, password: str = SOURCE_PASSWORD) -> None:
    from pykeepass import create_database

    kp = create_database(str(path), password=password)
    fill_kdbx(kp)
    cheap_argon2(kp)
    kp.save()
    assert kp.version[0] == 4, "create_database writes KDBX 4"


def cheap_argon2(kp: Any) -> None:
    """Keep the database's Argon2 KDF but at 1 MiB and 2 passes for its next save: pykeepass's
    default (64 MiB, 14 passes) costs ~0.75 CPU-s at every open, and each `apm import` opens it.
    What the importer reads (entries, groups, a wrong password refused) does not depend on it."""
    params = kp.kdbx.header.value.dynamic_header.kdf_parameters.data.dict
    params["M"].value = 1 << 20
    params["I"].value = 2


def fill_kdbx(kp: Any) -> None:
    """The fake content of the KeePass tests (also in fixtures/kdbx3/db31.kdbx, KDBX 3.1)."""
    work = kp.add_group(kp.root_group, "Work")
    servers = kp.add_group(work, "Servers")
    gh = kp.add_entry(
        work,
        "GitHub",
        "alice",
        "kp-gh-s3cret",
        url="https://github.com",
        notes="recovery: kp-r3c0very",
    )
    gh.otp = OTPAUTH
    gh.set_custom_property("API token", "kp-api-t0ken", protect=True)
    gh.set_custom_property("Team", "platform")
    native = kp.add_entry(servers, "db01", "root", "kp-db-s3cret")
    native.set_custom_property("TimeOtp-Secret-Base32", SEED, protect=True)
    native.set_custom_property("TimeOtp-Period", "30")
    kp.add_entry(kp.root_group, "Wifi", "", "kp-wifi-s3cret", tags=["home", "net"])
    gone = kp.add_entry(kp.root_group, "Old", "bob", "kp-old-s3cret")
    kp.trash_entry(gone)


# ---------------------------------------------------------------- Bitwarden


def bitwarden_plain() -> dict[str, Any]:
    return {
        "encrypted": False,
        "folders": [{"id": "f1", "name": "Personal"}],
        "items": [
            {
                "id": "i1",
                "organizationId": None,
                "folderId": "f1",
                "type": 1,
                "reprompt": 0,
                "name": "Example",
                "notes": "bw-n0tes-secret",
                "favorite": False,
                "fields": [
                    {"name": "pin", "value": "bw-p1n-4242", "type": 1, "linkedId": None},
                    {"name": "region", "value": "eu", "type": 0, "linkedId": None},
                ],
                "login": {
                    "uris": [{"match": None, "uri": "https://example.com/login"}],
                    "username": "alice@example.com",
                    "password": "bw-ex-s3cret",
                    "totp": OTPAUTH,
                },
                "collectionIds": None,
            },
            {
                "id": "i2",
                "folderId": None,
                "type": 2,
                "name": "Recovery codes",
                "notes": "bw-code-1 bw-code-2",
                "secureNote": {"type": 0},
            },
            {
                "id": "i3",
                "folderId": None,
                "type": 3,
                "name": "Visa",
                "card": {
                    "cardholderName": "Alice",
                    "brand": "Visa",
                    "number": "4111111111111111",
                    "expMonth": "12",
                    "expYear": "2030",
                    "code": "bw-cvv-123",
                },
            },
            {
                "id": "i4",
                "folderId": None,
                "type": 5,
                "name": "deploy key",
                "sshKey": {
                    "privateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\nbw-ssh-k3y\n"
                    "-----END OPENSSH PRIVATE KEY-----\n",
                    "publicKey": "ssh-ed25519 AAAAC3Nza deploy",
                    "keyFingerprint": "SHA256:x",
                },
            },
            {"id": "i5", "type": 1, "name": "deleted", "deletedDate": "2024-01-01T00:00:00Z",
             "login": {"username": "x", "password": "bw-deleted-pw"}},
        ],
    }  # fmt: skip


def _hkdf_expand(prk: bytes, info: bytes) -> bytes:
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _encstring(plain: bytes, enc: bytes, mac: bytes) -> str:
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    data = padder.update(plain) + padder.finalize()
    e = Cipher(algorithms.AES(enc), modes.CBC(iv)).encryptor()
    ct = e.update(data) + e.finalize()
    tag = hmac.new(mac, iv + ct, hashlib.sha256).digest()
    b = base64.b64encode
    return f"2.{b(iv).decode()}|{b(ct).decode()}|{b(tag).decode()}"


def bitwarden_encrypted(
    inner: dict[str, Any], password: str = SOURCE_PASSWORD, kdf: int = 0
) -> dict[str, Any]:
    """A password-protected export per Bitwarden's documented scheme (see the importer)."""
    salt = base64.b64encode(os.urandom(16)).decode()
    doc: dict[str, Any] = {"encrypted": True, "passwordProtected": True, "salt": salt}
    if kdf == 0:
        doc.update(kdfType=0, kdfIterations=5000, kdfMemory=None, kdfParallelism=None)
        key = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), 5000, 32)
    else:
        from argon2.low_level import Type, hash_secret_raw

        doc.update(kdfType=1, kdfIterations=2, kdfMemory=16, kdfParallelism=1)
        key = hash_secret_raw(
            password.encode(), hashlib.sha256(salt.encode()).digest(), time_cost=2,
            memory_cost=16 * 1024, parallelism=1, hash_len=32, type=Type.ID,
        )  # fmt: skip
    enc, mac = _hkdf_expand(key, b"enc"), _hkdf_expand(key, b"mac")
    doc["encKeyValidation_DO_NOT_EDIT"] = _encstring(os.urandom(16).hex().encode(), enc, mac)
    doc["data"] = _encstring(json.dumps(inner).encode(), enc, mac)
    return doc


# ---------------------------------------------------------------- 1Password


def make_1pux(path: Path) -> None:
    data = {
        "accounts": [
            {
                "attrs": {"accountName": "Alice", "name": "Alice", "email": "a@example.com"},
                "vaults": [
                    {
                        "attrs": {"uuid": "v1", "name": "Private", "type": "P"},
                        "items": [
                            {
                                "uuid": "u1", "favIndex": 0, "createdAt": 1700000000,
                                "updatedAt": 1700000000, "state": "active", "categoryUuid": "001",
                                "details": {
                                    "loginFields": [
                                        {"value": "alice", "id": "", "name": "username",
                                         "fieldType": "T", "designation": "username"},
                                        {"value": "op-gl-s3cret", "id": "", "name": "password",
                                         "fieldType": "P", "designation": "password"},
                                    ],
                                    "notesPlain": "op-n0tes",
                                    "sections": [
                                        {"title": "", "name": "add more", "fields": [
                                            {"title": "one-time password", "id": "TOTP_x",
                                             "value": {"totp": OTPAUTH}},
                                            {"title": "backup pin", "id": "p1",
                                             "value": {"concealed": "op-p1n-77"}},
                                            {"title": "team", "id": "t1",
                                             "value": {"string": "infra"}},
                                        ]},
                                    ],
                                    "passwordHistory": [],
                                },
                                "overview": {"subtitle": "alice", "urls": [],
                                             "title": "GitLab", "url": "https://gitlab.com",
                                             "tags": ["dev"]},
                            },
                            {
                                "uuid": "u2", "state": "active", "categoryUuid": "112",
                                "details": {"sections": [{"fields": [
                                    {"title": "credential", "id": "credential",
                                     "value": {"concealed": "op-api-k3y"}},
                                    {"title": "type", "id": "type", "value": {"menu": "bearer"}},
                                ]}]},
                                "overview": {"title": "Stripe API", "url": ""},
                            },
                            {
                                "uuid": "u3", "state": "archived", "categoryUuid": "001",
                                "details": {"loginFields": [
                                    {"value": "op-old", "designation": "password"}]},
                                "overview": {"title": "Archived one"},
                            },
                            {
                                "uuid": "u4", "state": "active", "categoryUuid": "003",
                                "details": {"notesPlain": "op-secure-n0te"},
                                "overview": {"title": "Safe note"},
                            },
                        ],
                    }
                ],
            }
        ]
    }  # fmt: skip
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("export.attributes", json.dumps({"version": 3, "description": "1PUX"}))
        z.writestr("export.data", json.dumps(data))


ONEPASSWORD_CSV = (
    "Title,Url,Username,Password,OTPAuth,Favorite,Archived,Tags,Notes\n"
    f'Example,https://example.com,alice,op-csv-s3cret,"{OTPAUTH}",false,false,"a,b",hi\n'
    "Old,https://old.example,bob,op-old-s3cret,,false,true,,\n"
)
CHROME_CSV = (
    "name,url,username,password,note\n"
    "example.com,https://example.com/,alice,chr-s3cret-1,\n"
    "example.com,https://example.com/,bob,chr-s3cret-2,\n"
    "nopass,https://nopass.example/,carol,,\n"
)
FIREFOX_CSV = (
    '"url","username","password","httpRealm","formActionOrigin","guid","timeCreated",'
    '"timeLastUsed","timePasswordChanged"\n'
    '"https://accounts.example.org","dave","ffx-s3cret-1",,"https://accounts.example.org",'
    '"{a}","1","1","1"\n'
)


# ---------------------------------------------------------------- pass (gpg)


def make_pass_store(store: Path, gnupghome: Path) -> dict[str, str]:
    gnupghome.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(gnupghome)}
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "Pass Test <pass@test>",
         "default", "default", "never"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    store.mkdir()
    (store / ".gpg-id").write_text("pass@test\n")
    files = {
        "email/fastmail": f"pass-fm-s3cret\nlogin: alice@fastmail.com\nurl: https://fastmail.com\n{OTPAUTH}\n",
        "work/vpn": "pass-vpn-s3cret\nuser: alice\nsecond line of notes\n",
        "web/fastmail": "pass-web-s3cret\n",
    }  # fmt: skip
    for name, text in files.items():
        out = store / f"{name}.gpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["gpg", "--batch", "--yes", "--trust-model", "always", "-r", "pass@test", "-e",
             "-o", str(out)],
            input=text.encode(), env=env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    return files


def stop_gpg_agent(gnupghome: Path) -> None:
    subprocess.run(
        ["gpgconf", "--kill", "gpg-agent"],
        env={**os.environ, "GNUPGHOME": str(gnupghome)},
        capture_output=True,
        timeout=30,
        check=False,
    )
