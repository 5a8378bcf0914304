#!/bin/sh
# Installs the services the test suite starts on its own (a Redis server), on Debian and
# Ubuntu. Idempotent: does nothing when redis-server is already on PATH.
set -eu

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "redis-server is missing and this is not root (no sudo): install the redis-server package" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is missing and apt-get is not available: install Redis 6 or newer" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends redis-server
# The tests start their own throw-away servers; the packaged one need not run.
redis-server --version
