#!/usr/bin/env bash
# Installs what the tests need (first run only) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
echo "test.sh: Debian packages some tests use (scripts/system-packages.sh; TAILOR_SYSTEM_PACKAGES=skip: check only):" >&2
scripts/system-packages.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
