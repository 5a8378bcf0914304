#!/usr/bin/env sh
# The seed's setup script, kept as a name: it is now `elaoms setup` (arguments pass
# through, e.g. --non-interactive, --force). Installs into .venv first when needed.
set -eu
cd "$(dirname "$0")/.."
[ -x .venv/bin/elaoms ] || make install
exec .venv/bin/elaoms setup "$@"
