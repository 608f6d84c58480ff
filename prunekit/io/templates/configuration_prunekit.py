"""Configuration of a pruned checkpoint whose modules no longer share one shape (written by prunekit).

It is the base architecture's own configuration class, unchanged; config.json adds two fields that
travel through it as plain attributes: ``prunekit_base`` (the transformers classes the checkpoint builds
on) and ``prunekit_modules`` (the Linear shapes and module attributes that differ from what the base
configuration builds, applied by ``modeling_prunekit``). Needs only transformers, not prunekit.
"""

import transformers

# prunekit writes the base architecture's configuration class here when it saves a checkpoint.
BASE_CONFIG_CLASS = "LlamaConfig"


class PrunekitConfig(getattr(transformers, BASE_CONFIG_CLASS)):
    """The base configuration; ``prunekit_modules`` rides along for :class:`PrunekitForCausalLM`."""
