"""Master-password strength: a weak one gets a warning and needs --allow-weak (init, passwd).

Rules:
- The estimate (zxcvbn) runs here, in the CLI, and the password never leaves the process for it.
- The warning shows zxcvbn's score, the guesses, the offline time at Argon2id-like speeds and
  zxcvbn's generic advice; never any part of the password.
"""

from __future__ import annotations

import getpass
import sys
from typing import TYPE_CHECKING, NamedTuple

from broker.wire.errors import InvalidParameters

if TYPE_CHECKING:
    from pydantic import SecretStr

MIN_SCORE = 3  # zxcvbn 0-4; 3 = "safely unguessable: moderate protection from offline attack"
ESTIMATE_CHARS = 100  # zxcvbn's matching grows faster than linearly; characters past it only add


class Estimate(NamedTuple):
    score: int
    guesses_log10: float
    offline: str  # time to guess it at 10^4 guesses/s (a slow hash such as Argon2id)
    warning: str
    suggestions: list[str]


def estimate(password: str) -> Estimate:
    from zxcvbn import zxcvbn

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    result = zxcvbn(password[:ESTIMATE_CHARS], user_inputs=["apm", "master", user])
    feedback = result.get("feedback") or {}
    return Estimate(
        score=int(result["score"]),
        guesses_log10=float(result["guesses_log10"]),
        offline=str(result["crack_times_display"]["offline_slow_hashing_1e4_per_second"]),
        warning=str(feedback.get("warning") or ""),
        suggestions=[str(s) for s in feedback.get("suggestions") or []],
    )


def check_master_password(password: SecretStr, *, allow_weak: bool) -> None:
    """Warn about a weak master password; refuse it unless --allow-weak."""
    est = estimate(password.get_secret_value())
    if est.score >= MIN_SCORE:
        return
    lines = [
        f"apm: warning: this master password is weak (strength {est.score} of 4, about "
        f"10^{est.guesses_log10:.0f} guesses: {est.offline} for an offline attack on a "
        "stolen vault file)"
    ]
    if est.warning:
        lines.append(f"apm: warning: {est.warning}")
    lines += [f"apm: warning: {s}" for s in est.suggestions]
    sys.stderr.write("\n".join(lines) + "\n")
    if not allow_weak:
        raise InvalidParameters(
            "the master password is too weak; nothing was changed",
            hint="choose a longer one (four or more random words make a good one), "
            "or pass --allow-weak to use this one anyway",
        )
