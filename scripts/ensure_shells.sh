#!/usr/bin/env bash
# zsh and fish for the completion tests (tests/test_completion.py loads the generated scripts in
# the real shells). Installed from the distribution when missing.
set -euo pipefail
if command -v zsh >/dev/null 2>&1 && command -v fish >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_shells: no apt-get; install zsh and fish yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y zsh fish >/dev/null || {
  $SUDO apt-get update >/dev/null
  $SUDO apt-get install -y zsh fish >/dev/null
}
