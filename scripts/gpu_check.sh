#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine that already has torch (CUDA), transformers,
# accelerate, pluggy, psutil, rich and pyyaml: install what was carried (wheels or a pip --target dir),
# install prunekit without dependencies (no lm-eval/datasets needed), run the check, keep everything
# under $OUT (default ./gpu_check_out). Extra arguments go to the check, e.g. --shapes llama-7b.
#   CARRY=deps bash scripts/gpu_check.sh            # deps/*.whl installed, or deps/ put on PYTHONPATH
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
if [ -n "${CARRY:-}" ]; then
  if compgen -G "$CARRY/*.whl" >/dev/null; then
    $PY -m pip install --no-index --no-deps -q "$CARRY"/*.whl 2>&1 | tail -3
  else
    export PYTHONPATH="$PWD/$CARRY${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
$PY -m pip install --no-index --no-deps --no-build-isolation -q -e . 2>&1 | tail -3
RUN_DIR="$PWD"
if [ -n "${SOURCE_LAYOUT:-}" ] || ! $PY -c "import prunekit.benchmarks.studies.gpu_check" 2>/dev/null; then
  # no setuptools to install with: lay the packages out as installed and declare the entry points by hand
  echo "pip could not install prunekit; using a source layout in .gpu_site" >&2
  mkdir -p .gpu_site/prunekit-0.dist-info
  mkdir -p .gpu_site/prunekit
  for d in prunekit/*; do ln -sfn "$PWD/$d" ".gpu_site/prunekit/$(basename "$d")"; done
  ln -sfn "$PWD/plugins" .gpu_site/prunekit/builtin; ln -sfn "$PWD/benchmarks" .gpu_site/prunekit/benchmarks
  $PY - <<'PY'
import tomllib
meta = tomllib.load(open("pyproject.toml", "rb"))["project"]
with open(".gpu_site/prunekit-0.dist-info/METADATA", "w") as f:
    f.write("Metadata-Version: 2.1\nName: prunekit\nVersion: 0\n")
with open(".gpu_site/prunekit-0.dist-info/entry_points.txt", "w") as f:
    for group, eps in meta["entry-points"].items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
PY
  RUN_DIR="$PWD/.gpu_site"  # run from there: the repository's own prunekit/ must not shadow the layout
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c "import torch, transformers, torch_pruning, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'torch-pruning', torch_pruning.__version__, 'pydantic', pydantic.__version__)"; \
} 2>&1 | tee "$OUT/gpu_env.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# fewer fragmentation OOMs near the 141 GB limit; the JSON records it (allocated-memory peaks do not depend on it)
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
(cd "$RUN_DIR" && $PY -m prunekit.benchmarks.studies.gpu_check --device cuda --out "$OUT/gpu_check.json" "$@" \
  > "$OUT/gpu_check_stdout.json" 2> >(tee "$OUT/gpu_check_stderr.txt" >&2))
code=$?
$PY - "$OUT/gpu_check.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"total {doc.get('total_seconds')} s")
for s in doc.get("summary", []):
    print(json.dumps(s))
PY
exit $code
