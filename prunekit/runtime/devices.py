"""Where a model lives: ``--device``, ``--device-map``, ``--max-memory`` and offload, all through accelerate.

prunekit does no sharding of its own. Loading hands ``device_map``/``max_memory``/``offload_folder`` to
``from_pretrained`` (or, for prunekit's per-layer checkpoints, to accelerate's ``dispatch_model``); every
stage afterwards asks this module where inputs go (:func:`input_device`) and, where it needs the values
of weights that accelerate keeps on ``meta`` between forwards (disk/CPU offload), onloads them for the
block with :func:`onloaded`, writing changed (pruned) tensors back into accelerate's weights map.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from prunekit.errors import UserError

DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_MAP_DEVICE = re.compile(r"^(cpu|disk|cuda(:\d+)?|\d+)$")
_MEMORY_KEY = re.compile(r"^(cpu|disk|\d+|cuda:\d+)$")


# ------------------------------------------------------------------------------ validation


def device_problem(value: Any) -> str | None:
    """Why ``value`` is not a device prunekit accepts (cpu, cuda, cuda:N), or None when it is one."""
    if isinstance(value, str) and _DEVICE.match(value):
        return None
    return f"{value!r} is not a device (accepted: cpu, cuda, cuda:N)"


def check_device(value: str, field: str = "device") -> str:
    """``value`` if it is cpu/cuda/cuda:N and present on this machine, else a one-line UserError naming ``field``."""
    problem = device_problem(value)
    if problem:
        raise UserError(f"{field}: {problem}")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{field}: {value} requested but no CUDA device is available (accepted here: cpu)")
        index = int(value.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"{field}: {value} requested but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s) (accepted: cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return value


def parse_device_map(value: Any) -> str | dict[str, Any] | None:
    """A device map: None, a strategy name (auto, balanced, balanced_low_0, sequential), or module name →
    device (cpu, disk, cuda[:N] or a GPU index), given as a dict or a JSON object string. ValueError otherwise."""
    if value is None or (isinstance(value, str) and value in DEVICE_MAP_NAMES):
        return value
    if isinstance(value, str):
        if not value.lstrip().startswith("{"):
            raise ValueError(f"{value!r} is neither {', '.join(DEVICE_MAP_NAMES)} nor a JSON object "
                             f"(module name -> cpu | disk | cuda:N | N)")
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict) or not value:
        raise ValueError("must be auto, balanced, balanced_low_0, sequential or a non-empty mapping "
                         "module name -> device")
    out: dict[str, Any] = {}
    for module, device in value.items():
        if isinstance(device, bool) or not isinstance(device, (str, int)) or not _MAP_DEVICE.match(str(device)):
            raise ValueError(f"module {module!r}: {device!r} is not a device (accepted: cpu, disk, cuda, cuda:N, N)")
        out[str(module)] = int(device) if str(device).isdigit() else device
    return out


def parse_max_memory(value: Any) -> dict[Any, Any] | None:
    """Memory per device for accelerate: ``0=70GiB,1=70GiB,cpu=200GiB``, a JSON object or a dict.
    Keys: a GPU index, cuda:N, cpu or disk; values: a size (``70GiB``, ``500MB``) or bytes. ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
        else:
            pairs = [p for p in text.split(",") if p.strip()]
            if not pairs or any("=" not in p for p in pairs):
                raise ValueError(f"{value!r}: expected DEVICE=SIZE[,DEVICE=SIZE...], e.g. 0=70GiB,1=70GiB,cpu=200GiB")
            value = dict(p.strip().split("=", 1) for p in pairs)
    if not isinstance(value, dict) or not value:
        raise ValueError("must map devices (0, 1, cuda:N, cpu, disk) to sizes, e.g. 0=70GiB,cpu=200GiB")
    from accelerate.utils import convert_file_size_to_int

    out: dict[Any, Any] = {}
    for key, size in value.items():
        key = str(key).strip()
        if not _MEMORY_KEY.match(key):
            raise ValueError(f"{key!r} is not a device (accepted: 0, 1, ..., cuda:N, cpu, disk)")
        try:
            nbytes = convert_file_size_to_int(size.strip() if isinstance(size, str) else size)
        except (ValueError, TypeError):
            nbytes = -1
        if isinstance(size, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"{key}: {size!r} is not a size (e.g. 70GiB, 500MB, or a number of bytes)")
        out[int(key.rpartition(":")[2]) if key[-1].isdigit() else key] = size.strip() if isinstance(size, str) else size
    return out


def _user_error(field: str, exc: ValueError) -> UserError:
    return UserError(f"{field}: {exc}")


def placement(device: str = "cpu", device_map: Any = None, max_memory: Any = None,
              offload_folder: str | Path | None = None) -> dict[str, Any]:
    """Checked loading arguments (UserError naming the field): ``{"device": ...}`` for one device, or
    ``device_map``/``max_memory``/``offload_folder`` for accelerate."""
    check_device(device)
    try:
        device_map = parse_device_map(device_map)
    except ValueError as exc:
        raise _user_error("device_map", exc) from None
    try:
        max_memory = parse_max_memory(max_memory)
    except ValueError as exc:
        raise _user_error("max_memory", exc) from None
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise UserError("device_map: --max-memory and --offload-folder need a device map "
                            "(accepted: auto, balanced, balanced_low_0, sequential or a JSON mapping)")
        return {"device": device}
    if isinstance(device_map, dict):
        for target in set(device_map.values()):
            if isinstance(target, int) or str(target).startswith("cuda"):
                check_device(f"cuda:{target}" if isinstance(target, int) else target, "device_map")
    if isinstance(max_memory, dict) and "disk" in max_memory:
        raise UserError("max_memory: 'disk' is not a budget accelerate takes; what does not fit goes to disk "
                        "when --offload-folder is set")
    to_disk = isinstance(device_map, dict) and "disk" in device_map.values()
    if to_disk and offload_folder is None:
        raise UserError("offload_folder: the device map puts modules on 'disk'; pass --offload-folder DIR")
    return {"device_map": device_map, "max_memory": max_memory,
            "offload_folder": str(Path(offload_folder).expanduser()) if offload_folder is not None else None}


# ----------------------------------------------------------------------------- a loaded model


def _hooked(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, Any]]:
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            yield name, module, hook


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate placed ``model`` (a device map with hooks), rather than one plain ``.to(device)``."""
    return bool(getattr(model, "hf_device_map", None)) and any(True for _ in _hooked(model))


def offloaded(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose weights accelerate offloads (kept on ``meta``, loaded at each forward)."""
    return [name for name, _, hook in _hooked(model)
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None]


def _as_device(value: Any) -> torch.device:
    return torch.device(f"cuda:{value}" if isinstance(value, int) else value)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a forward pass's input ids must go: the execution device of the input embeddings (accelerate's
    first device), else the device of the first parameter that is not on ``meta``."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        hook = getattr(embeddings, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return _as_device(hook.execution_device)
        weight = getattr(embeddings, "weight", None)
        if weight is not None and weight.device.type != "meta":
            return weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def refuse_gradients_with_offload(model: torch.nn.Module, method: str, needs_gradients: bool) -> None:
    """Gradient-based scoring cannot run on offloaded weights (they are ``meta`` between forwards, so no
    gradient accumulates on them): a one-line UserError naming the flag, before any work."""
    names = offloaded(model) if needs_gradients else []
    if names:
        raise UserError(f"device_map: method {method!r} needs gradients, which cannot accumulate on weights "
                        f"offloaded to disk/CPU ({len(names)} modules, e.g. {names[0]}); give every module a "
                        f"device (cpu or cuda:N) in --device-map, raise --max-memory, or use a data-free method "
                        f"(magnitude, random)")


def check_offloaded_run(model: torch.nn.Module, method: str, needs_gradients: bool, recovery: str = "none") -> None:
    """Refuse, before any work, what cannot run on offloaded weights: gradient scoring and recovery training."""
    refuse_gradients_with_offload(model, method, needs_gradients)
    names = offloaded(model) if recovery != "none" else []
    if names:
        raise UserError(f"device_map: recovery {recovery!r} trains through weights offloaded to disk/CPU "
                        f"({len(names)} modules, e.g. {names[0]}); give every module a device (cpu or cuda:N) "
                        f"in --device-map, raise --max-memory, or run recovery without offload")


@contextlib.contextmanager
def onloaded(model: torch.nn.Module, module_names: Any = None) -> Iterator[list[str]]:
    """Give offloaded modules (all, or those named or nested under ``module_names``) real tensors on the CPU for
    the block, with their hook's offloading paused and their execution moved to the CPU; each returns its
    output to its input's device (``io_same_device``), so a forward in the block (torch-pruning's trace)
    computes them on the CPU while everything around them (norms, rotary tables, residual adds) stays on
    the GPU they execute on. Afterwards write each tensor (possibly pruned to a new shape) back into
    accelerate's weights map (in host memory: the input checkpoint is never written) and put the module
    back on ``meta`` and its hook as it was. Yields the onloaded module names."""
    from accelerate.utils import set_module_tensor_to_device

    wanted = None if module_names is None else tuple(module_names)
    chosen = []
    for name, module, hook in _hooked(model):
        if not (getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None):
            continue
        if wanted is not None and not any(name == w or name.startswith(w + ".") for w in wanted):
            continue
        chosen.append((name, module, hook))
    placed: list[tuple[Any, Any, str]] = []
    saved = [(hook.execution_device, hook.io_same_device) for _, _, hook in chosen]
    try:
        for name, module, hook in chosen:
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for tname, t in tensors:
                if t.device.type == "meta" and tname in hook.weights_map:
                    set_module_tensor_to_device(module, tname, "cpu", value=hook.weights_map[tname])
                    placed.append((module, hook, tname))
            hook.offload, hook.execution_device, hook.io_same_device = False, torch.device("cpu"), True
        yield [name for name, _, _ in chosen]
    finally:
        for module, hook, tname in placed:
            value = getattr(module, tname).detach().to("cpu")
            _store(hook.weights_map, tname, value)
            set_module_tensor_to_device(module, tname, "meta")
        for (_, _, hook), (device, same) in zip(chosen, saved):
            hook.offload, hook.execution_device, hook.io_same_device = True, device, same


def _store(weights_map: Any, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into accelerate's weights map (a PrefixedDataset over an OffloadedWeightsLoader or a dict),
    in memory, so that later forwards and ``save_pretrained`` read it instead of the offloaded original."""
    dataset, key = getattr(weights_map, "dataset", weights_map), getattr(weights_map, "prefix", "") + name
    store = getattr(dataset, "state_dict", None)
    if isinstance(store, dict):
        store[key] = value
        keys = getattr(dataset, "all_keys", None)
        if isinstance(keys, list) and key not in keys:
            keys.append(key)
    else:
        dataset[key] = value


def dispatch(model: torch.nn.Module, device_map: str | dict[str, Any], max_memory: dict | None = None,
             offload_folder: str | None = None) -> torch.nn.Module:
    """Place a model already loaded on the CPU (prunekit's per-layer checkpoints) with accelerate, as
    ``from_pretrained(device_map=...)`` would: a strategy name is turned into a map with accelerate's
    ``infer_auto_device_map`` (``balanced``: over ``get_balanced_memory``), then ``dispatch_model``."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if isinstance(device_map, str):
        if device_map in ("balanced", "balanced_low_0"):
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if "disk" in device_map.values() and offload_folder is None:
        raise UserError("offload_folder: the model does not fit --max-memory, so part of it goes to disk; "
                        "pass --offload-folder DIR")
    if set(device_map.values()) <= {"cpu"}:
        model.hf_device_map = dict(device_map)
        return model
    model.tie_weights()
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder)


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool = True) -> Iterator[torch.nn.Module]:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (calibration
    memory ~ one layer's activations; the gradient is the same). transformers only checkpoints in training
    mode, so the model is in ``train()`` for the block (LLaMA-family attention dropout is 0)."""
    if not enabled or not getattr(model, "supports_gradient_checkpointing", False):
        yield model
        return
    was_on, was_training = checkpointing_on(model), model.training
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield model
    finally:
        if not was_on:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether some module of ``model`` recomputes its activations (transformers' checkpointing flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _group_modules(groups: Any) -> list[str]:
    """Every module some group slices or follows (the weights scoring reads and pruning changes)."""
    names = {s.module_name for g in groups for s in g.slices}
    names |= {s.module_name for g in groups for s in getattr(g, "followers", ())}
    return sorted(names)


@contextlib.contextmanager
def for_scoring(model: torch.nn.Module, groups: Any, method: str, needs_gradients: bool) -> Iterator[None]:
    """Scoring on an offloaded model: refuse gradient methods (see :func:`refuse_gradients_with_offload`);
    data-free methods read the grouped weights, onloaded to the CPU for the block. A no-op otherwise."""
    if not offloaded(model):
        yield
        return
    refuse_gradients_with_offload(model, method, needs_gradients)
    with onloaded(model, _group_modules(groups)):
        yield


@contextlib.contextmanager
def for_pruning(model: torch.nn.Module, groups: Any) -> Iterator[None]:
    """Pruning an offloaded model: the grouped modules get real tensors for the surgery, and the pruned
    tensors go back into accelerate's weights map (so hooks load the new shapes). A no-op otherwise."""
    if not offloaded(model):
        yield
        return
    with onloaded(model, _group_modules(groups)):
        yield


def mapped_device(device_map: dict[str, Any], module: str) -> Any:
    """The device a device map gives ``module``: the entry of its longest mapped prefix ("" maps everything)."""
    best = max((k for k in device_map if k == "" or module == k or module.startswith(k + ".")), key=len, default=None)
    return None if best is None else device_map[best]


def check_tied_placement(config: Any, device_map: Any) -> None:
    """A model whose output head is tied to its input embeddings must keep both on one device (accelerate
    cannot load the shared tensor for a head offloaded apart from it): a UserError naming ``device_map``."""
    if not isinstance(device_map, dict) or not getattr(config, "tie_word_embeddings", False):
        return
    head, embeddings = mapped_device(device_map, "lm_head"), mapped_device(device_map, "model.embed_tokens")
    if head is not None and embeddings is not None and head != embeddings:
        raise UserError(f"device_map: this model ties lm_head to model.embed_tokens; map both to the same device "
                        f"(got lm_head -> {head}, model.embed_tokens -> {embeddings})")
