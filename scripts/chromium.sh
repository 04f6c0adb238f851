#!/usr/bin/env bash
# A Chromium for the web console's browser tests (Playwright for Python drives it):
# - Debian: the distribution's chromium package at /usr/bin/chromium, installed only when
#   missing (root, or sudo); Playwright's own browser download is never used.
# - Ubuntu (GitHub's runners): `apt-get install chromium` there is a snap shim that does not
#   run headless in CI, so Playwright installs its own Chromium and the libraries it needs
#   (`playwright install --with-deps chromium`, a download from Playwright's CDN); the tests
#   use it when /usr/bin/chromium is absent.
# Idempotent. PY: the interpreter with playwright installed (the Makefile passes the venv's).
set -euo pipefail
chromium=${CHROMIUM_PATH:-/usr/bin/chromium}
py=${PY:-python3}
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
distro=$(. /etc/os-release && echo "${ID:-unknown}")

if [ "$distro" = ubuntu ] && [ ! -x "$chromium" ]; then
  # --with-deps runs apt-get itself (through sudo when not root)
  "$py" -m playwright install --with-deps chromium
  "$py" -c 'from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    print("Playwright Chromium at", p.chromium.executable_path)'
  exit 0
fi
if [ ! -x "$chromium" ]; then
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
"$chromium" --headless --no-sandbox --disable-gpu --version 2>/dev/null
