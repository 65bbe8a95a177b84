#!/usr/bin/env bash
# zsh and fish for the completion tests (tests/test_completion.py loads the generated scripts in
# the real shells). Installed from the distribution when missing.
set -euo pipefail
if command -v zsh >/dev/null 2>&1 && command -v fish >/dev/null 2>&1; then
  exit 0
fi
exec "$(dirname "$0")/apt_install.sh" zsh fish
