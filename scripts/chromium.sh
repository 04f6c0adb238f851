#!/usr/bin/env bash
# Provides /usr/bin/chromium for the web console's browser tests (Playwright for Python
# drives the system's Chromium; Playwright's own browser download is never used): Debian's
# chromium package, installed only when missing (root, or sudo). Idempotent; without it the
# browser tests skip.
set -euo pipefail
chromium=${CHROMIUM_PATH:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
"$chromium" --headless --no-sandbox --disable-gpu --version 2>/dev/null
