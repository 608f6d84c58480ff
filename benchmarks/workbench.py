"""One loaded model and the public API's stages a benchmark needs: groups, calibration, scoring, selection,
pruning, perplexity (:mod:`prunekit.api`, the same functions ``prunekit.prune`` runs).

The dense float32 model is loaded once and never modified; every experiment works on a deep copy.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit import api
from prunekit.adapters.base import Adapter
from prunekit.adapters.grouping import GrouperOptions
from prunekit.benchmarks.profiles import Profile
from prunekit.core.groups import PruningGroup
from prunekit.core.layers import resolve_layers
from prunekit.data.sampling import CalibrationSampler
from prunekit.data.sources import Text, load_text
from prunekit.eval.perplexity import perplexity
from prunekit.plugin.registry import MethodEntry, Registry, get_registry


@dataclass
class Workbench:
    """The dense model, its tokenizer and the settings every suite shares."""

    registry: Registry
    model: torch.nn.Module
    tokenizer: Any
    source: str
    profile: Profile
    device: str = "cpu"
    layers: range = field(init=False)
    _texts: dict[str, Text] = field(default_factory=dict, init=False)
    _dense_ppl: dict[str, float] = field(default_factory=dict, init=False)
    cache: dict[str, Any] = field(default_factory=dict, init=False)  # per-model results shared across suites

    def __post_init__(self) -> None:
        """Resolve the default layer range for this model (the one ``prunekit.prune`` uses)."""
        self.layers = resolve_layers(self.adapter(self.model).num_layers, None)

    @classmethod
    def open(cls, model: str | None, profile: Profile, device: str = "cpu") -> "Workbench":
        """Load ``model`` (None: the embedded SmolLM2-135M) in float32 through the API's loader."""
        dense, tokenizer, source = api.load_model(model, "float32", device)
        for p in dense.parameters():
            p.requires_grad_(False)
        return cls(get_registry(), dense, tokenizer, source, profile, device)

    def adapter(self, model: torch.nn.Module) -> Adapter:
        """The registered architecture adapter for ``model``."""
        return self.registry.adapter_for(model)

    def method(self, name: str) -> MethodEntry:
        """A registered method preset (raises prunekit's UserError when unknown)."""
        return self.registry.method(name)

    def groups(self, model: torch.nn.Module, grouper: GrouperOptions | None = None) -> list[PruningGroup]:
        """The pruning groups of ``model`` from the registered ``blocks`` grouper."""
        return api.build_groups(model, self.layers, grouper or GrouperOptions(), self.registry)

    def calibration(self, seed: int) -> tuple[list[torch.Tensor], dict]:
        """Seeded calibration batches (profile sizes) and their provenance."""
        p = self.profile
        return api.calibrate(self.tokenizer, source=p.calib_source, n_samples=p.calib_samples,
                             seq_len=p.calib_seq_len, batch_size=p.calib_batch, seed=seed)

    def sampler(self, seed: int) -> CalibrationSampler:
        """Seeded calibration draws of the profile's size (draw 0 is :meth:`calibration` of ``seed``)."""
        p = self.profile
        return CalibrationSampler(self.tokenizer, p.calib_source, p.calib_samples, p.calib_seq_len, p.calib_batch, seed)

    def score(self, model: torch.nn.Module, groups: list[PruningGroup], method: str, batches: list[torch.Tensor],
              seed: int, compute_dtype: torch.dtype = torch.float32,
              options: dict | None = None, calib_seed: int | None = None) -> tuple[list[torch.Tensor], dict, float]:
        """Unit scores, the method's info and the wall seconds, through the API's scorer.

        ``compute_dtype`` other than float32 estimates in that precision, which a run never does; it
        measures what a low-precision estimation changes. Methods get a calibration sampler (as in a run)
        whose draw 0 is ``batches``, i.e. of ``calib_seed`` (default ``seed``), so presets that draw a fresh
        sample per step (``resample``) work here too.
        """
        started = time.perf_counter()
        scores, info = api.score(model, groups, method, batches, options=options, seed=seed,
                                 compute_dtype=compute_dtype, registry=self.registry,
                                 sampler=self.sampler(seed if calib_seed is None else calib_seed))
        return scores, info, time.perf_counter() - started

    @staticmethod
    def keep(groups: list[PruningGroup], scores: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
        """Kept units per group: local selection, as ``prunekit.prune``'s default."""
        return api.select(groups, scores, ratio)

    def pruned(self, model: torch.nn.Module, groups: list[PruningGroup], kept: list[torch.Tensor]) -> torch.nn.Module:
        """A pruned deep copy of ``model`` (the input stays whole)."""
        clone = copy.deepcopy(model)
        api.apply(clone, groups, kept, self.registry)
        return clone.eval()

    def text(self, corpus: str) -> Text:
        """The evaluation split of a corpus, loaded once."""
        if corpus not in self._texts:
            self._texts[corpus] = load_text(corpus, self.profile.ppl_split)
        return self._texts[corpus]

    def ppl(self, model: torch.nn.Module, corpus: str) -> float:
        """Perplexity on the profile's capped windows of ``corpus``."""
        p = self.profile
        result = perplexity(model, self.tokenizer, self.text(corpus), window=p.ppl_window, batch_size=p.ppl_batch,
                            max_windows=p.ppl_max_windows, progress=False)
        return float(result["ppl"])

    def dense_ppl(self, corpus: str) -> float:
        """Perplexity of the unpruned model (cached)."""
        if corpus not in self._dense_ppl:
            self._dense_ppl[corpus] = self.ppl(self.model, corpus)
        return self._dense_ppl[corpus]

    def describe(self) -> dict:
        """What was benchmarked: model source, size, layers pruned, profile."""
        return {"model": self.source, "model_type": self.model.config.model_type,
                "params": self.model.num_parameters(), "layers_pruned": [self.layers.start, self.layers.stop],
                "num_layers": self.adapter(self.model).num_layers, "device": self.device,
                "profile": self.profile.as_dict()}
