"""Big vaults for the benchmarks, built one way (bench/vault.py and bench/writes.py share it).

Benchmarks cannot import tests/, so this is their fixture module. A vault is built directly with
broker.core: realistic entries (logins, API keys, tokens, TOTP seeds; tags, urls, notes) with
sealed secret fields, inserted in bulk and committed once.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.core import crypto
from broker.core.crypto import PROFILES
from broker.core.vault import StoredEntry, StoredField, Vault

SERVICES = (
    *("github", "gitlab", "bitbucket", "aws", "gcp", "azure", "stripe", "paypal", "slack"),
    *("discord", "notion", "linear", "jira", "confluence", "datadog", "sentry", "pagerduty"),
    *("cloudflare", "fastly", "vercel", "netlify", "heroku", "docker", "npm", "pypi", "openai"),
    *("anthropic", "twilio", "sendgrid", "mailgun", "postgres", "mysql", "redis", "mongodb"),
    *("elastic", "kafka", "vault", "okta", "auth0", "google", "microsoft", "apple", "dropbox"),
    *("figma", "zoom"),
)
TAGS = ("work", "personal", "prod", "staging", "ci", "billing", "infra", "legacy")
SPACES = ("default", "work", "personal")
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
PRINTABLE = ALNUM + "!#$%&()*+,-./:;<=>?@[]^_{|}~"
B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"

# (name, space, primary secret) of some entries, to fetch and check
Sample = list[tuple[str, str, str]]


def _secret(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choices(alphabet, k=n))


def entry_at(
    vault: Vault, rng: random.Random, i: int, n: int, base: datetime
) -> tuple[StoredEntry, str]:
    """Entry number `i` of `n` (its kind and space follow from `i`), and its primary secret."""
    svc = SERVICES[i % len(SERVICES)]
    kind = i % 10
    eid = str(uuid.uuid4())
    space = ("work", "personal", "default", "default", "default")[i % 5]
    when = base - timedelta(minutes=n - i)
    tags = rng.sample(TAGS, rng.randint(0, 2))
    url: str | None = None
    fields: dict[str, StoredField] = {}
    if kind <= 5:
        etype, primary = "login", "password"
        name = f"{svc}-login-{i:06d}"
        url = f"https://{svc}.example.com/login"
        fields["username"] = StoredField(secret=False, value=f"user{i}@example.com")
        value = _secret(rng, PRINTABLE, rng.randint(16, 28))
    elif kind <= 7:
        etype, primary = "api_key", "key"
        name = f"{svc}-api-key-{i:06d}"
        fields["service"] = StoredField(secret=False, value=svc)
        fields["key_id"] = StoredField(secret=False, value=f"kid_{i:08x}")
        value = "sk_live_" + _secret(rng, ALNUM, 40)
    elif kind == 8:
        etype, primary = "token", "token"
        name = f"{svc}-token-{i:06d}"
        fields["service"] = StoredField(secret=False, value=svc)
        value = _secret(rng, ALNUM + "-_", 96)
    else:
        etype, primary = "totp", "secret"
        name = f"{svc}-2fa-{i:06d}"
        fields["issuer"] = StoredField(secret=False, value=svc)
        fields["account"] = StoredField(secret=False, value=f"user{i}@example.com")
        fields["digits"] = StoredField(secret=False, value="6")
        fields["period"] = StoredField(secret=False, value="30")
        value = _secret(rng, B32, 32)
    fields[primary] = StoredField(secret=True, sealed=vault._seal(eid, primary, value))
    entry = StoredEntry(
        id=eid,
        name=name,
        type=etype,
        space=space,
        tags=tags,
        url=url,
        notes=f"rotated quarterly; owner team-{i % 17}" if i % 7 == 0 else None,
        fields=fields,
        created_at=when,
        updated_at=when,
    )
    return entry, value


def build_vault(
    path: Path,
    n: int,
    *,
    password: str,
    seed: int | None = None,
    profile: str = "interactive",
    samples: int = 200,
    format: int = 2,
) -> tuple[Vault, Sample]:
    """A vault of `n` entries at `path`, committed once; returns it open with a shuffled sample
    of about `samples` (name, space, primary secret). `format=1`: today's v1 file (0.1.0)."""
    rng = random.Random(n if seed is None else seed)
    pw = crypto.normalize_password(password)
    try:
        vault = Vault.create(path, pw, PROFILES[profile], format=format)
    finally:
        crypto.zero(pw)
    base = datetime.now(UTC)
    every = max(1, n // max(1, samples))
    sample: Sample = []
    with vault.mutation():
        vault.spaces = list(SPACES)
        for i in range(n):
            entry, value = entry_at(vault, rng, i, n, base)
            vault.entries[entry.id] = entry
            if i % every == 0:
                sample.append((entry.name, entry.space, value))
        vault._reindex()
    rng.shuffle(sample)
    return vault, sample
