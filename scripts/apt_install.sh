#!/usr/bin/env bash
# Install Debian packages the tests drive (apt-get install PKG...), with sudo unless root and an
# apt-get update only when the first try fails. Used by the ensure_*.sh scripts.
set -euo pipefail
if ! command -v apt-get >/dev/null 2>&1; then
  echo "apt_install: no apt-get; install these yourself: $*" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y "$@" >/dev/null || {
  $SUDO apt-get update >/dev/null
  $SUDO apt-get install -y "$@" >/dev/null
}
