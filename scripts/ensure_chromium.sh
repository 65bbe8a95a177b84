#!/usr/bin/env bash
# Debian's headless chromium + its matched chromedriver for the approval page's browser tests
# (tests/test_approve_page_browser.py). Installed from the distribution when missing; no
# browser is ever downloaded at run time.
set -euo pipefail
if [ -x /usr/lib/chromium/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: no apt-get; install chromium and chromium-driver yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y chromium chromium-driver >/dev/null || {
  $SUDO apt-get update >/dev/null
  $SUDO apt-get install -y chromium chromium-driver >/dev/null
}
