#!/usr/bin/env bash
# Install llama.cpp's Python binding (llama-cpp-python) into .venv: the runtime tests/test_gguf.py runs
# prunekit's GGUF exports in. PyPI has only its source for Linux, so it is compiled once, CPU only, with
# everything the tests do not need switched off (no llava/mtmd, BLAS, OpenMP, curl, tools, tests). The
# wheel is kept in prunekit's cache, keyed by version and CPU flags: a fresh .venv installs it in seconds.
# Idempotent: when the pinned version already imports, it does nothing.
# -march=native is off (a cached wheel must not hold instructions another machine lacks); AVX2/FMA/F16C
# (x86-64-v3) are switched on only where this CPU has them, and the cache key says which.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36  # vendors a llama.cpp that has the `deci` architecture (src/models/deci.cpp)
PY=.venv/bin/python
pip() {  # quiet pip that keeps its exit status and drops this machine's noise about absent local indexes
  "$PY" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}

if "$PY" - "$VERSION" <<'EOF' 2>/dev/null; then
import sys
from importlib.metadata import version
assert version("llama_cpp_python") == sys.argv[1]
import llama_cpp  # noqa: F401  (the shared libraries load)
EOF
  exit 0
fi

simd=(-DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF)
variant=generic
if [ "$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo \
    && grep -qw f16c /proc/cpuinfo; then
  simd=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
  variant=x86-64-v3
fi
wheels="${PRUNEKIT_CACHE:-$HOME/.cache/prunekit}/wheels/llama-cpp-python-$VERSION-$variant"
if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  mkdir -p "$wheels"
  echo "llama-cpp-python $VERSION: compiling llama.cpp ($variant, CPU only; a few minutes on 2 cores)"
  started=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF ${simd[*]} -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF \
-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel -q --no-deps --no-binary llama-cpp-python \
      -w "$wheels" "llama-cpp-python==$VERSION"
  echo "llama-cpp-python $VERSION: built in $(( $(date +%s) - started )) s into $wheels"
fi
# Its dependencies: numpy, jinja2 and typing-extensions come with prunekit (held to constraints.txt); diskcache.
pip install -q --no-deps "$wheels"/llama_cpp_python-"$VERSION"-*.whl
pip install -q -c constraints.txt numpy jinja2 typing-extensions diskcache
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready')"
