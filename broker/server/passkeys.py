"""The owner's passkeys: WebAuthn registration and user-verifying assertions (the `webauthn`
library), for proof of presence on the approval page.

Rules:
- Credentials (id, public key, sign count) live in the vault's sealed payload
  (`extra["passkeys"]`), so they are as protected as the vault and travel with it.
- Relying party "localhost": WebAuthn refuses IP-address origins, so the page is opened as
  http://localhost:PORT and the expected origin names that port exactly.
- Every ceremony needs user verification (PIN, biometrics), not just presence, and a fresh
  challenge issued for that page; a challenge is used once.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.exceptions import InvalidAuthenticationResponse, InvalidRegistrationResponse
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from broker.core.vault import Vault
from broker.wire.errors import PermissionDenied

RP_ID = "localhost"
RP_NAME = "apm"
USER_ID = b"apm-owner"


def stored(vault: Vault) -> list[dict[str, Any]]:
    raw = vault.extra.get("passkeys", [])
    return list(raw) if isinstance(raw, list) else []


def registered(vault: Vault | None) -> bool:
    return vault is not None and bool(stored(vault))


def registration_options(vault: Vault) -> tuple[str, bytes]:
    """The options JSON for navigator.credentials.create, and its challenge."""
    opts = generate_registration_options(
        rp_id=RP_ID,
        rp_name=RP_NAME,
        user_id=USER_ID,
        user_name="owner",
        user_display_name="apm vault owner",
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[
            PublicKeyCredentialDescriptor(id=base64url_to_bytes(c["id"])) for c in stored(vault)
        ],
    )
    return options_to_json(opts), opts.challenge


def verify_registration(
    credential: dict[str, Any], challenge: bytes, origin: str, label: str, now: datetime
) -> dict[str, Any]:
    """The record to store for a new credential, or PERMISSION_DENIED."""
    try:
        got = verify_registration_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=RP_ID,
            expected_origin=origin,
            require_user_verification=True,
        )
    except (InvalidRegistrationResponse, ValueError, KeyError, TypeError) as exc:
        raise PermissionDenied(
            "the passkey registration did not verify", hint="try again from apm passkey add"
        ) from exc
    return {
        "id": bytes_to_base64url(got.credential_id),
        "public_key": bytes_to_base64url(got.credential_public_key),
        "sign_count": got.sign_count,
        "label": label[:100],
        "created_at": now.isoformat(),
    }


def authentication_options(vault: Vault) -> tuple[str, bytes]:
    opts = generate_authentication_options(
        rp_id=RP_ID,
        allow_credentials=[
            PublicKeyCredentialDescriptor(id=base64url_to_bytes(c["id"])) for c in stored(vault)
        ],
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    return options_to_json(opts), opts.challenge


def verify_assertion(
    vault: Vault, credential: dict[str, Any], challenge: bytes, origin: str
) -> dict[str, Any]:
    """Check a user-verifying assertion against a registered credential; returns the stored
    record with its new sign count (the caller persists it)."""
    cred_id = credential.get("id") if isinstance(credential, dict) else None
    match = next((c for c in stored(vault) if c["id"] == cred_id), None)
    if match is None:
        raise PermissionDenied("that passkey is not registered with this vault")
    try:
        got = verify_authentication_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=RP_ID,
            expected_origin=origin,
            credential_public_key=base64url_to_bytes(match["public_key"]),
            credential_current_sign_count=int(match["sign_count"]),
            require_user_verification=True,
        )
    except (InvalidAuthenticationResponse, ValueError, KeyError, TypeError) as exc:
        raise PermissionDenied(
            "the passkey assertion did not verify", hint="reload the page and try again"
        ) from exc
    return {**match, "sign_count": got.new_sign_count}


def parse_credential(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise PermissionDenied("the passkey answer is not JSON") from exc
    if not isinstance(doc, dict):
        raise PermissionDenied("the passkey answer is not a JSON object")
    return doc
