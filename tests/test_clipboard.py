"""`apm get NAME --clip`: copies through a clipboard tool and clears it only if unchanged.

The clipboard tool is external (an X or Wayland server is not there in CI), so a fake `xclip`
that keeps the clipboard in a file stands in for it; everything on apm's side is real.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from broker.cli import clipboard
from broker.wire.errors import ExternalToolMissing

from .conftest import PASSWORD, Apm, Broker, clean_env

FAKE_XCLIP = """#!/bin/sh
# fake xclip: the clipboard is the file $FAKE_CLIP
echo "$@" >> "$FAKE_CLIP.log"
case "$*" in
  *-out*) cat "$FAKE_CLIP" 2>/dev/null ;;
  *) cat > "$FAKE_CLIP" ;;
esac
"""


@pytest.fixture
def fake_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "xclip"
    exe.write_text(FAKE_XCLIP)
    exe.chmod(0o755)
    clip = tmp_path / "clip"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("DISPLAY", ":42")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("FAKE_CLIP", str(clip))
    return clip


def _wait(cond: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_clear_if_unchanged_clears_only_the_value_it_copied(fake_clip: Path) -> None:
    import hashlib

    tool = clipboard.find_tool()
    assert tool.name == "xclip"
    clipboard.copy(tool, b"s3cret-clip-value")
    digest = hashlib.sha256(b"s3cret-clip-value").hexdigest()
    clipboard.copy(tool, b"something the person copied since")
    assert clipboard.clear_if_unchanged(tool, digest) is False
    assert fake_clip.read_bytes() == b"something the person copied since"
    clipboard.copy(tool, b"s3cret-clip-value")
    assert clipboard.clear_if_unchanged(tool, digest) is True
    assert fake_clip.read_bytes() == b""


def test_no_clipboard_tool_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("DISPLAY", ":42")
    with pytest.raises(ExternalToolMissing) as err:
        clipboard.find_tool()
    assert err.value.code == "EXTERNAL_TOOL_MISSING"
    assert err.value.hint


@pytest.mark.slow
def test_get_clip_copies_then_clears_and_the_clearer_never_holds_the_value_in_argv(
    vault: Broker, apm: Apm, home: Path, fake_clip: Path
) -> None:
    secret = "clip-s3cret-value-42"
    apm.ok("add", "api_key", "svc", "--from-stdin", stdin=secret + "\n")
    env = clean_env(home)
    got = apm("get", "svc", "--clip", "--clear-after", "30", password=PASSWORD, env=env)
    assert got.returncode == 0, got.stderr
    assert got.stdout == ""
    assert fake_clip.read_text() == secret
    clearers = [
        p
        for p in psutil.process_iter(["cmdline", "pid"])
        if "broker.cli.clipboard" in " ".join(p.info["cmdline"] or [])
        and p.environ().get("FAKE_CLIP") == str(fake_clip)
    ]
    assert clearers, "a clearer process is waiting"
    try:
        for p in clearers:
            assert secret not in " ".join(p.info["cmdline"])
    finally:
        for p in clearers:
            p.kill()

    got = apm("get", "svc", "--clip", "--clear-after", "1", password=PASSWORD, env=env)
    assert got.returncode == 0, got.stderr
    assert _wait(lambda: fake_clip.read_bytes() == b""), "the clipboard was cleared"


def test_get_clip_without_a_tool_fails_with_a_hint(vault: Broker, apm: Apm, home: Path) -> None:
    apm.ok("add", "api_key", "svc", "--from-stdin", stdin="another-s3cret\n")
    env = clean_env(home, PATH=os.path.dirname(sys.executable), DISPLAY=":42")
    got = apm("get", "svc", "--clip", password=PASSWORD, env=env)
    assert got.returncode == 14
    assert "no clipboard tool" in got.stderr
    assert "another-s3cret" not in got.stdout + got.stderr


def test_generate_clip_copies_a_fresh_password_and_prints_nothing(
    apm: Apm, fake_clip: Path
) -> None:
    got = apm("generate", "--clip", "--clear-after", "0", "--length", "30", env=clean_env(apm.home))
    assert got.returncode == 0, got.stderr
    assert got.stdout == ""
    assert len(fake_clip.read_text()) == 30
    assert fake_clip.read_text() not in got.stderr
