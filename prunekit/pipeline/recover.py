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


def needs_teacher(entry: Any) -> bool:
    """Whether the registered recovery trainer asks for a teacher (class attribute ``needs_teacher``): then the core
    calls ``recover(model, tokenizer, config, teacher=...)``."""
    return bool(entry is not None and getattr(entry.impl, "needs_teacher", False))


def teacher_option(options: Any) -> str | None:
    """The teacher a user named in the recovery options (an option called ``teacher``), if any."""
    value = getattr(options, "teacher", None)
    return value if isinstance(value, str) and value.strip() else None


def call_recovery(entry: Any, options: Any, model: Any, tokenizer: Any, config: RunConfig,
                  teacher: Any = None) -> dict[str, Any]:
    """Run the recovery trainer on ``model`` in place: ``cls(options).recover(model, tokenizer, config)``, with
    ``teacher=`` when the class declares ``needs_teacher``. Returns what it reported for run.json."""
    recovery = entry.impl(options)
    if needs_teacher(entry):
        if teacher is None:
            raise UserError(f"recovery: {entry.name!r} needs a teacher model and none was given")
        return recovery.recover(model, tokenizer, config, teacher=teacher)
    return recovery.recover(model, tokenizer, config)


def recorded_source(manifest: dict[str, Any] | None) -> str | None:
    """The dense model a pruned checkpoint came from, as its run.json recorded it (``model_source``; through
    ``pruned_from`` when the checkpoint is itself a ``prunekit recover`` output)."""
    seen = 0
    while isinstance(manifest, dict) and manifest.get("command") == "recover" and seen < 100:
        manifest, seen = manifest.get("pruned_from"), seen + 1
    source = manifest.get("model_source") if isinstance(manifest, dict) else None
    return source if isinstance(source, str) and source.strip() else None


def teacher_source(options: Any, manifest: dict[str, Any] | None, pruned: str) -> dict[str, str]:
    """Where ``prunekit recover``'s teacher comes from: ``recovery.options.teacher``, else the source model in the
    checkpoint's run.json; checked like ``--model`` (a local folder must exist) before anything is loaded."""
    from prunekit.io.load import model_source

    named = teacher_option(options)
    if named is not None:
        return {"source": model_source(named, "recovery.options.teacher"), "from": "recovery.options.teacher"}
    recorded = recorded_source(manifest)
    if recorded is None:
        raise UserError(f"recovery.options.teacher: {pruned}/run.json records no source model to distill from; "
                        f"name the dense model with -o teacher=PATH_OR_HUB_ID")
    try:
        source = model_source(recorded, "recovery.options.teacher")
    except UserError as exc:
        raise UserError(f"{exc} (the source model {pruned}/run.json records; name the dense model with "
                        f"-o teacher=PATH_OR_HUB_ID)") from None
    return {"source": source, "from": "run.json model_source"}


def load_teacher(source: str, dtype: str, device: str) -> Any:
    """The teacher model in eval mode without gradients (``dtype``: the student's, so no float32 copy of it)."""
    from prunekit.io.load import load_model

    try:
        teacher, _, _ = load_model(source, dtype, device)
    except UserError as exc:
        message = str(exc)
        raise UserError("recovery.options.teacher: " + message.removeprefix("model: ")) from None
    teacher.requires_grad_(False)
    return teacher.eval()


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
    pruned_manifest = check_pruned(source)
    teacher_from = teacher_source(options, pruned_manifest, source) if needs_teacher(entry) else None
    if is_main_process():
        claim(output)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = "cpu" if launched else config.device  # launched: the trainer moves it to this process's device
    model, tokenizer, resolved = load_model(source, config.dtype, device)
    timings["load"] = round(time.perf_counter() - start, 3)
    parameters = sum(p.numel() for p in model.parameters())

    teacher = None
    if teacher_from is not None:
        start = time.perf_counter()
        teacher = load_teacher(teacher_from["source"], config.dtype, device)
        timings["load_teacher"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    info = call_recovery(entry, options, model, tokenizer, config, teacher)
    del teacher  # the teacher is not needed to save
    timings["recover"] = round(time.perf_counter() - start, 3)
    if not is_main_process():
        return None
    manifest = {"command": "recover", "source": resolved,
                "config": {"recovery": {"method": entry.name, "options": options.model_dump(mode="json")},
                           "seed": config.seed, "dtype": config.dtype, "device": config.device,
                           "overwrite": config.overwrite},
                "versions": package_versions(),
                "recovery": {"method": entry.name, "info": info, **({"teacher": teacher_from} if teacher_from else {})},
                "parameters": parameters, "timings": timings, "pruned_from": input_manifest(source)}
    save_pruned(model, tokenizer, output, manifest, overwrite=config.overwrite)
    return manifest


def finish_distributed() -> None:
    """Tear down the process group the trainer opened, so launched processes exit without warnings."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
