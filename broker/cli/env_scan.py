"""Finding secret-looking values in .env files: known token prefixes, key names and entropy.

Rules:
- Findings carry file, line, key and kind; never the value.
- A value that is already an `apm://` reference, empty, a number, a boolean or a placeholder
  is never a finding.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_FILE = 1 << 20
SKIP_DIRS = {".git", "node_modules", ".venv", "venv", "__pycache__", ".tox", ".mypy_cache"}

# (kind, pattern): the value starts with / looks like a known credential format
KNOWN: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(p))
    for kind, p in (
        ("stripe-secret-key", r"^(sk|rk)_(live|test)_[A-Za-z0-9]{10,}$"),
        ("github-token", r"^gh[pousr]_[A-Za-z0-9]{30,}$"),
        ("github-fine-grained-token", r"^github_pat_[A-Za-z0-9_]{30,}$"),
        ("aws-access-key-id", r"^(AKIA|ASIA)[A-Z0-9]{16}$"),
        ("slack-token", r"^xox[abposr]-[A-Za-z0-9-]{10,}$"),
        ("gitlab-token", r"^glpat-[A-Za-z0-9_-]{20,}$"),
        ("anthropic-api-key", r"^sk-ant-[A-Za-z0-9_-]{20,}$"),
        ("openai-api-key", r"^sk-(proj-)?[A-Za-z0-9_-]{20,}$"),
        ("google-api-key", r"^AIza[A-Za-z0-9_-]{35}$"),
        ("npm-token", r"^npm_[A-Za-z0-9]{36}$"),
        ("pypi-token", r"^pypi-[A-Za-z0-9_-]{50,}$"),
        ("huggingface-token", r"^hf_[A-Za-z0-9]{30,}$"),
        ("sendgrid-api-key", r"^SG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}$"),
        ("private-key", r"^-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        ("jwt", r"^eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}$"),
        ("url-with-password", r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),
    )
)
SECRET_NAME = re.compile(
    r"(SECRET|PASSWORD|PASSWD|PWD|TOKEN|API_?KEY|PRIVATE_?KEY|ACCESS_?KEY|CREDENTIAL|AUTH|"
    r"_KEY$|^KEY$|SALT|SIGNING)",
    re.IGNORECASE,
)
PLACEHOLDER = re.compile(
    r"^(|changeme|change_me|secret|password|xxx+|\*+|todo|tbd|none|null|example|test|dummy|"
    r"your[-_ ].*|<.*>|\$\{.*\}|\$[A-Z_]+)$",
    re.IGNORECASE,
)
ENV_NAME = re.compile(r"^(\.env(\..+)?|.+\.env)$")


@dataclass(frozen=True)
class Line:
    number: int
    key: str
    value: str
    exported: bool
    quote: str  # the quote character the value had, or ""


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    key: str
    kind: str


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    if not value:
        return 0.0
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def parse_lines(text: str) -> Iterator[Line]:
    """KEY=VALUE lines as `apm run --env-file` reads them; others are skipped."""
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exported = line.startswith("export ")
        if exported:
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            continue
        value = value.strip()
        quote = ""
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            quote, value = value[0], value[1:-1]
        yield Line(n, key, value, exported, quote)


def classify(key: str, value: str) -> str | None:
    """The kind of secret `value` looks like, or None."""
    if value.startswith("apm://") or PLACEHOLDER.match(value):
        return None
    for kind, pattern in KNOWN:
        if pattern.match(value):
            return kind
    if value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return None
    if re.fullmatch(r"[-+]?[0-9._]+", value):
        return None
    plain_url = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value) is not None
    if SECRET_NAME.search(key) and len(value) >= 8 and not plain_url:
        return "secret-by-name"
    classes = sum(
        bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^A-Za-z0-9]")
    )
    if len(value) >= 20 and entropy(value) >= 3.5 and classes >= 2 and not plain_url:
        if "/" in value and " " not in value and value.count("/") > 2:
            return None  # a path
        return "high-entropy"
    return None


def scan_text(path: Path, text: str) -> list[Finding]:
    out = []
    for ln in parse_lines(text):
        kind = classify(ln.key, ln.value)
        if kind is not None:
            out.append(Finding(path, ln.number, ln.key, kind))
    return out


def env_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if any(part in SKIP_DIRS for part in path.relative_to(root).parts[:-1]):
            continue
        if path.is_file() and not path.is_symlink() and ENV_NAME.match(path.name):
            yield path


def read_small(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE:
            return None
        return path.read_text(errors="replace")
    except OSError:
        return None
