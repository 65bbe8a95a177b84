"""Checking an SSH private key before it is saved: a key cut short or mangled is refused.

`cryptography` is imported only here and only when a key is checked, so `apm` starts without it.
"""

from __future__ import annotations

from broker.wire.errors import InvalidParameters

HINT = (
    "give the whole key, from its -----BEGIN line to its -----END line: "
    "--from-file ~/.ssh/id_ed25519, --editor, or paste it and press Ctrl-D"
)


def check_private_key(text: str) -> str:
    """Parse `text` as an OpenSSH (or PEM) private key; return its kind, or refuse it.

    An encrypted OpenSSH key is checked up to its encrypted part (opening it needs the bcrypt
    module, and the passphrase is the person's to keep right)."""
    from cryptography.hazmat.primitives.serialization import (
        load_pem_private_key,
        load_ssh_private_key,
    )

    key: object
    data = text.encode()
    if not data.endswith(b"\n"):
        data += b"\n"
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            key = load_ssh_private_key(data, password=None)
        else:
            key = load_pem_private_key(data, password=None)
    except TypeError as exc:  # "password-protected": the envelope parsed, the rest is sealed
        if "password" in str(exc).lower() or "encrypted" in str(exc).lower():
            return "encrypted private key"
        raise InvalidParameters("private_key is not a valid SSH private key", hint=HINT) from None
    except Exception:  # ValueError, UnsupportedAlgorithm, ...: each means refuse
        raise InvalidParameters("private_key is not a valid SSH private key", hint=HINT) from None
    return type(key).__name__.lstrip("_").replace("PrivateKey", " private key")
