#!/usr/bin/env bash
# Installs what the service needs (first run only) and starts it on the embedded default:
# the bundled MiniLM base, a SQLite registry and a local adapter store under $TAILOR_HOME.
# `tailor serve` gives this instance its own metrics folder ($TAILOR_HOME/instances/<host>-<port>,
# see service/instance.py), so other instances on this host never read or wipe its /metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TAILOR_HOME=${TAILOR_HOME:-$PWD/.tailor}
exec .venv/bin/tailor serve --host "${HOST:-127.0.0.1}" --port "${PORT:-3000}" "$@"
