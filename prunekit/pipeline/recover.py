"""``prunekit recover``: recovery fine-tuning of an already pruned checkpoint, saved like a run's output.

Pruning happens once, in one process; recovery may then run data parallel (``accelerate launch -m
prunekit.cli.commands recover ...``) or sharded (the trainer's FSDP / DeepSpeed options). Every process loads the
pruned model and trains; only the main process writes the output, through the same atomic publishing as
``prunekit run`` (:mod:`prunekit.io.safety`). The output's ``run.json`` keeps the input's pruning manifest.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prunekit.core.config import RunConfig
from prunekit.errors import UserError


def rank() -> int:
    """This process's global rank under ``accelerate launch`` / ``torchrun`` (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Only the main process checks out the output folder and writes it."""
    return rank() == 0


def plan_recovery(config: RunConfig, registry: Any) -> tuple[Any, Any]:
    """The recovery entry and its validated options (UserError naming ``recovery.*``); ``none`` means lora."""
    from prunekit.core.validation import validate_options
    from prunekit.pipeline.checks import check_sources

    name = "lora" if config.recovery.method == "none" else config.recovery.method
    entry = registry.named("recovery", name)
    options = validate_options(entry.impl.Options, config.recovery.options, "recovery.options.")
    check_sources(config, False, options)  # offline recovery text, before loading anything
    return entry, options


def input_manifest(source: str | os.PathLike) -> dict[str, Any] | None:
    """The pruned checkpoint's own ``run.json`` (how it was pruned), when it has a readable one."""
    try:
        data = json.loads((Path(source) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_pruned(source: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's prunekit manifest; a :class:`UserError` for a folder prunekit did not write (a model that
    was never pruned: recovery would fine-tune it and label the result as recovered)."""
    manifest = input_manifest(source)
    if manifest is None or not {"config", "versions"} <= set(manifest):
        what = "no run.json" if not (Path(source) / "run.json").exists() else "its run.json is not prunekit's"
        raise UserError(f"recover: {source} is not a model prunekit pruned ({what}); prune it first with "
                        f"prunekit run --model {source} --output DIR, then recover DIR")
    return manifest


def recover_checkpoint(source: str, output: Path, config: RunConfig, registry: Any = None) -> dict[str, Any] | None:
    """Load the pruned ``source``, run the configured recovery trainer on it, save it to ``output`` (main
    process only). Returns the manifest written, or None on the other processes."""
    from prunekit.core.versions import package_versions
    from prunekit.io.export import save_pruned
    from prunekit.io.load import load_model
    from prunekit.io.safety import check_output, claim
    from prunekit.plugin.registry import get_registry
    from prunekit.runtime.paths import expand_path

    if not str(source).strip() or not Path(source).is_dir():
        raise UserError(f"recover: {source!r} is not a directory; give a pruned checkpoint folder")
    registry = registry or get_registry()
    entry, options = plan_recovery(config, registry)
    output = expand_path(output, "output")
    check_output(output, config.overwrite, source)  # every process refuses alike, before loading
    check_pruned(source)
    if is_main_process():
        claim(output)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = "cpu" if launched else config.device  # launched: the trainer moves it to this process's device
    model, tokenizer, resolved = load_model(source, config.dtype, device)
    timings["load"] = round(time.perf_counter() - start, 3)
    parameters = sum(p.numel() for p in model.parameters())

    start = time.perf_counter()
    info = entry.impl(options).recover(model, tokenizer, config)
    timings["recover"] = round(time.perf_counter() - start, 3)
    if not is_main_process():
        return None
    manifest = {"command": "recover", "source": resolved,
                "config": {"recovery": {"method": entry.name, "options": options.model_dump(mode="json")},
                           "seed": config.seed, "dtype": config.dtype, "device": config.device,
                           "overwrite": config.overwrite},
                "versions": package_versions(), "recovery": {"method": entry.name, "info": info},
                "parameters": parameters, "timings": timings, "pruned_from": input_manifest(source)}
    save_pruned(model, tokenizer, output, manifest, overwrite=config.overwrite)
    return manifest


def finish_distributed() -> None:
    """Tear down the process group the trainer opened, so launched processes exit without warnings."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
