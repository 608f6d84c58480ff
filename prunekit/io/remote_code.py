"""Modeling code a per-layer-shape checkpoint carries, so it loads without prunekit.

``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` then builds the base
architecture's own class and resizes the pruned modules before the weights load. The code is the
pair of templates in ``prunekit/templates/`` (real Python files; only the base class names are filled
in); what to resize comes from the adapter (:meth:`prunekit.adapters.base.Adapter.module_shapes`).
Uniform checkpoints get no code: plain ``from_pretrained`` loads them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import nn

from prunekit.adapters.hf import transformers_class

TEMPLATES = Path(__file__).parent / "templates"
CONFIG_FILE = "configuration_prunekit.py"
MODELING_FILE = "modeling_prunekit.py"
AUTO_MAP = {
    "AutoConfig": "configuration_prunekit.PrunekitConfig",
    "AutoModelForCausalLM": "modeling_prunekit.PrunekitForCausalLM",
}
REMOTE_ARCHITECTURE = "PrunekitForCausalLM"
CONFIG_KEYS = ("auto_map", "prunekit_base", "prunekit_modules")




def _public_name(cls: type) -> str:
    """``cls``'s name, checked to be importable as ``transformers.<name>`` (what the templates do)."""
    import transformers

    if getattr(transformers, cls.__name__, None) is not cls:
        raise ValueError(f"transformers.{cls.__name__} is not {cls.__module__}.{cls.__name__}; "
                         "cannot write loading code for this architecture")
    return cls.__name__


def render(template: str, constant: str, value: str) -> str:
    """The template file's text with the one ``CONSTANT = "..."`` line set to ``value``."""
    text = (TEMPLATES / template).read_text()
    text, n = re.subn(rf'^{constant} = ".*"$', f'{constant} = "{value}"', text, flags=re.MULTILINE)
    if n != 1:
        raise RuntimeError(f"template {template}: expected one {constant} line, found {n}")
    return text


def module_shapes(model: nn.Module) -> dict:
    """What loading code must resize for ``model`` (empty when plain ``from_pretrained`` suffices)."""
    from prunekit.adapters.base import Adapter
    from prunekit.errors import UserError
    from prunekit.plugin.registry import get_registry

    try:
        adapter = get_registry().adapter_for(model)
    except UserError:  # no adapter for it: the generic comparison still applies
        adapter = Adapter(model)
    return adapter.module_shapes()


def write_remote_code(model: nn.Module, directory: Path) -> bool:
    """After ``save_pretrained`` into ``directory``: add loading code if ``model``'s shapes need it.

    Rewrites ``config.json`` (``auto_map``, ``prunekit_base``, ``prunekit_modules``, ``architectures``)
    and writes the two code files, or, for a uniform model, removes any of these left over from a
    checkpoint it was loaded from. Returns whether code was written.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    for key in CONFIG_KEYS:
        config.pop(key, None)
    for name in (CONFIG_FILE, MODELING_FILE):
        (directory / name).unlink(missing_ok=True)
    base_model = transformers_class(type(model))
    spec = module_shapes(model)
    if not any(spec.values()):
        if config.get("architectures") == [REMOTE_ARCHITECTURE]:
            config["architectures"] = [base_model.__name__]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return False
    base_config = transformers_class(type(model.config))
    (directory / CONFIG_FILE).write_text(render(CONFIG_FILE, "BASE_CONFIG_CLASS", _public_name(base_config)))
    (directory / MODELING_FILE).write_text(render(MODELING_FILE, "BASE_ARCHITECTURE", _public_name(base_model)))
    config.update(
        auto_map=AUTO_MAP,
        architectures=[REMOTE_ARCHITECTURE],
        prunekit_base={"model_type": config.get("model_type"), "architecture": base_model.__name__,
                       "config_class": base_config.__name__},
        prunekit_modules=spec,
    )
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def checkpoint_folder(source: str | os.PathLike, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None) -> Path:
    """A local folder with ``source``'s config and weights: ``source`` itself, or its hub snapshot.

    A hub id is looked up in ``cache_dir`` (default: the hub cache) and downloaded only when neither
    ``local_files_only`` nor ``HF_HUB_OFFLINE`` forbids it; only configs and safetensors are fetched.
    """
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), revision=revision, cache_dir=cache_dir,
                                  local_files_only=bool(local_files_only), allow_patterns=["*.json", "*.safetensors"]))
