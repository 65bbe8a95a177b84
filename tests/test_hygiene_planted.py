"""The secret-hygiene sweep is not vacuous: a test that leaks a registered secret into a file
under its APM_HOME makes the pytest run fail, on one worker and on several (pytest-xdist).

The leaking test runs in a child pytest over a throwaway package that uses this suite's
conftest, next to a control run without the leak that passes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LEAKY = """
from tests.conftest import register_secret


def test_writes_a_secret_where_it_must_not(home) -> None:
    value = "planted-Leak-Value-{n}"
    register_secret(value)
    {leak}


def test_a_neighbour_that_does_nothing_wrong() -> None:
    assert True
"""


def _run(tmp_path: Path, leak: bool, workers: int) -> subprocess.CompletedProcess[str]:
    pkg = tmp_path / f"planted_{int(leak)}_{workers}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    body = 'home.joinpath("broker.log").write_text("oops " + value)' if leak else "pass"
    (pkg / "test_leaky.py").write_text(LEAKY.format(n=workers, leak=body))
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg)]
    if workers > 1:
        argv += ["-n", str(workers)]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_planted_leak_fails_the_run_and_a_clean_run_passes(tmp_path: Path, workers: int) -> None:
    leaky = _run(tmp_path, leak=True, workers=workers)
    assert leaky.returncode != 0, leaky.stdout[-2000:]
    assert "secrets found in plaintext" in leaky.stdout, leaky.stdout[-2000:]
    clean = _run(tmp_path, leak=False, workers=workers)
    assert clean.returncode == 0, clean.stdout[-2000:]
