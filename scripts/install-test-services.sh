#!/bin/sh
# Installs what the test suite runs besides Python packages, on Debian and Ubuntu: a Redis
# server and a PostgreSQL server (the tests start their own throw-away servers: initdb into
# a temporary directory), wrk (the load benchmark's client, which a smoke test runs at a
# tiny size) and Chromium (the console's browser tests drive it headless with Playwright;
# never `playwright install`). Idempotent: installs only what is missing.
set -eu

missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
# Debian keeps the server's binaries off PATH, under /usr/lib/postgresql/<version>/bin.
postgres_bin() {
    for dir in "$(pg_config --bindir 2>/dev/null)" /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}
postgres_bin >/dev/null || missing="$missing postgresql"
if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "missing:$missing, and this is not root (no sudo): install these packages" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing:$missing, and apt-get is not available: install Redis 6 or newer, PostgreSQL 13 or newer, wrk and Chromium" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# shellcheck disable=SC2086  # one word per package
$SUDO apt-get install -y -q --no-install-recommends $missing
# The packaged servers need not run: the tests start their own.
redis-server --version
"$(postgres_bin)/postgres" --version
wrk --version 2>&1 | head -n 1 || true
chromium --version 2>/dev/null || true
