#!/usr/bin/env bash
# Debian's headless chromium + its matched chromedriver for the approval page's browser tests
# (tests/test_approve_page_browser.py). Installed from the distribution when missing; no
# browser is ever downloaded at run time.
set -euo pipefail
if [ -x /usr/lib/chromium/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
exec "$(dirname "$0")/apt_install.sh" chromium chromium-driver
