#!/usr/bin/env bash
# Provides build/redis/redis-server for the tests (the fleet queue runs on a real Redis):
# the redis-server on PATH when there is one, else Debian's package (and the two
# libraries it needs) unpacked under build/redis without installing anything. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/redis
wrapper=$out/redis-server
[ -x "$wrapper" ] && exit 0
mkdir -p "$out"
if command -v redis-server >/dev/null 2>&1; then
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v redis-server)" > "$wrapper"
else
  debs=$out/debs
  mkdir -p "$debs"
  (cd "$debs" && apt-get download redis-server redis-tools libjemalloc2 liblzf1)
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$out/root"; done
  root=$(cd "$out/root" && pwd)
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/usr/lib/x86_64-linux-gnu exec %s/usr/bin/redis-server "$@"\n' \
    "$root" "$root" > "$wrapper"
fi
chmod +x "$wrapper"
"$wrapper" --version
