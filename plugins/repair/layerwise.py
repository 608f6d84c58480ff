"""Layer-by-layer engine shared by bias compensation and the least-squares re-fit.

The dense reference and the pruned model are walked one decoder layer at a time, never with one full
forward pass per layer:

* Inputs of the first decoder layer are captured once per calibration batch (the GPTQ "Catcher": a
  forward pre-hook that records the hidden states and raises to stop). The keyword arguments every layer
  receives (position embeddings, attention mask, ...) are recorded from one forward pass of the dense
  model (stopped at the last layer's input), per layer, since some families give layers different masks
  (sliding-window layers).
* Two streams of hidden states then go through the layers: the dense one through the dense layers, the
  pruned one through the pruned (already repaired) layers. For each repaired output projection the dense
  layer's pass records its output ``Y_d``; the pruned layer's pass records the projection's input ``X_p``
  (``inputs="sequential"``). With ``inputs="dense"`` the projection's input is the dense one restricted to
  the surviving columns, ``X_d[:, kept]``, and no pruned stream is needed.
* Within a layer the attention output projection is repaired first and the MLP's projection is fitted on
  inputs computed with the repaired attention.

Statistics are accumulated per projection in float64 (per-batch Gram products in float64 by default,
float32 on request: faster, but the Gram matrix squares the inputs' condition number; on the projection's
device): token count, sums of inputs / targets / current outputs / current errors, the squared norms, and
optionally the Gram matrices ``X^T X`` and ``X^T Y`` (memory O(width^2) per projection, one at a time).

Tensors stay on each layer's device (the execution device under an accelerate device map). Weights
offloaded to disk/CPU (``meta`` between forwards) are refused.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

KINDS = ("attention", "mlp")
ALIASES = {"o_proj": "attention", "attn": "attention", "down_proj": "mlp"}


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


# ------------------------------------------------------------------------------------ helpers


def kept_columns(groups_or_result: Any, kept: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Which input columns of each pruned output projection survived, in dense-model indices.

    Pass a :class:`prunekit.api.PruneResult` or ``(groups, kept)`` (the pruning groups and kept unit indices).
    Returns ``{module name: sorted LongTensor of dense input columns kept}`` for every input-column slice
    (``o_proj`` columns of the kept heads, ``down_proj`` columns of the kept channels). The pruned
    projection's weight is the dense one's columns in that order (``W_p == W_d[:, cols]``) until something
    (LoRA recovery, a repair) changes it.
    """
    if kept is None:
        groups, kept = groups_or_result.groups, groups_or_result.kept
    else:
        groups = groups_or_result
    out: dict[str, torch.Tensor] = {}
    for group, keep in zip(groups, kept):
        keep = torch.as_tensor(keep, dtype=torch.long)
        for s in group.slices:
            if s.dim != 1:
                continue
            if s.module_name in out:
                raise ValueError(f"{s.module_name}: input columns belong to two groups; cannot map them")
            out[s.module_name] = group.channels_of(keep, s).cpu()
    return out


def normalize_which(which: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(ALIASES.get(w, w) for w in which))
    bad = [w for w in kinds if w not in KINDS]
    if bad or not kinds:
        raise ValueError(f"which: {bad or which!r}; accepted: attention (o_proj), mlp (down_proj)")
    return kinds


def _as_device(value: Any) -> torch.device:
    return torch.device(f"cuda:{value}" if isinstance(value, int) else value)


def layer_device(layer: nn.Module) -> torch.device:
    """Where ``layer`` computes: accelerate's execution device when dispatched, else its parameters' device."""
    hook = getattr(layer, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return _as_device(hook.execution_device)
    for p in layer.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor (also inside tuples, lists and dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def check_not_offloaded(*models: nn.Module) -> None:
    from prunekit.runtime.devices import offloaded

    for model in models:
        names = offloaded(model)
        if names:
            raise ValueError(f"repair cannot change weights offloaded to disk/CPU ({len(names)} modules, e.g. "
                             f"{names[0]}); give every module a device (cpu or cuda:N)")


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _eval(*models: nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@contextlib.contextmanager
def tap(module: nn.Module, store: dict, stop: bool = False) -> Iterator[dict]:
    """Record ``module``'s input (``store["x"]``) and output (``store["y"]``) at its next call; ``stop`` ends
    the forward pass there (raises :class:`_Stop`)."""

    def hook(_mod, args, output):
        store["x"], store["y"] = args[0], output
        if stop:
            raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _run(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return _output(layer(hidden, **kwargs))


def _run_until(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, module: nn.Module) -> dict:
    """Run ``layer`` until ``module`` has computed; its input and output."""
    store: dict = {}
    with tap(module, store, stop=True):
        try:
            layer(hidden, **kwargs)
        except _Stop:
            pass
    if "x" not in store:
        raise RuntimeError("the projection was not called by its decoder layer")
    return store


# ------------------------------------------------------------------------------- layer inputs


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor],
                       per_layer_kwargs: bool) -> tuple[list[torch.Tensor], list[list[dict]] | None]:
    """The hidden states entering decoder layer 0 for every batch; with ``per_layer_kwargs`` also the keyword
    arguments each layer receives (one forward pass per batch, stopped at the last layer's input), else the
    model stops at layer 0."""
    from prunekit.runtime.devices import input_device

    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = []
    current: list[dict | None] = []

    def catch(index: int):
        def pre_hook(_mod, args, kw):
            kw = dict(kw)
            h = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                hidden.append(h.detach())
            if per_layer_kwargs:
                current[index] = kw
            if not per_layer_kwargs or index == len(layers) - 1:
                raise _Stop  # nothing after this layer's inputs is needed (no last layer, norm or logits)
        return pre_hook

    handles = [layer.register_forward_pre_hook(catch(i), with_kwargs=True)
               for i, layer in enumerate(layers) if per_layer_kwargs or i == 0]
    device = input_device(model)
    try:
        for batch in batches:
            current[:] = [None] * len(layers)
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
            if per_layer_kwargs:
                if any(k is None for k in current):
                    raise RuntimeError("a decoder layer was not called in the forward pass")
                kwargs.append(list(current))
    finally:
        for h in handles:
            h.remove()
    return hidden, (kwargs if per_layer_kwargs else None)


# ---------------------------------------------------------------------------------- statistics


@dataclass
class Stats:
    """Float64 sums over the calibration tokens for one projection ``y = x W^T + b`` against dense targets."""

    gram: bool
    product_dtype: torch.dtype = torch.float64  # dtype of the per-batch X^T X products (accumulated in float64)
    n: int = 0
    sum_x: torch.Tensor | None = None
    sum_y: torch.Tensor | None = None      # dense target outputs
    sum_p: torch.Tensor | None = None      # current (pruned) outputs
    sq_y: float = 0.0                      # sum ||y_d||^2
    sq_e: float = 0.0                      # sum ||y_p - y_d||^2
    xtx: torch.Tensor | None = None
    xty: torch.Tensor | None = None        # X^T (Y_d - b) (the fit target, see ``target``)
    sq_t: float = 0.0                      # sum ||target||^2
    extra: dict = field(default_factory=dict)

    def add(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """``x`` the projection's input, ``y`` the dense output, ``p`` the current output (all [..., width])."""
        x = x.reshape(-1, x.shape[-1]).float()
        y = y.reshape(-1, y.shape[-1]).float()
        p = p.reshape(-1, p.shape[-1]).float()
        if self.sum_x is None:
            self.sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.sum_y = torch.zeros(y.shape[1], dtype=torch.float64, device=x.device)
            self.sum_p = torch.zeros(y.shape[1], dtype=torch.float64, device=x.device)
        self.n += x.shape[0]
        self.sum_x += x.sum(0, dtype=torch.float64)
        self.sum_y += y.sum(0, dtype=torch.float64)
        self.sum_p += p.sum(0, dtype=torch.float64)
        self.sq_y += float(y.double().square().sum())
        self.sq_e += float((p - y).double().square().sum())
        if self.gram:
            t = y if target is None else target.reshape(-1, y.shape[-1]).float()
            if self.xtx is None:
                self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.xty = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
            xc, tc = x.to(self.product_dtype), t.to(self.product_dtype)
            self.xtx += (xc.T @ xc).double()
            self.xty += (xc.T @ tc).double()
            self.sq_t += float(t.double().square().sum())

    def rel_error(self, sq_error: float) -> float:
        return (max(sq_error, 0.0) / self.sq_y) ** 0.5 if self.sq_y > 0 else 0.0


# ------------------------------------------------------------------------------------ the walk


@dataclass(frozen=True)
class Target:
    """One output projection to repair in layer ``layer``."""

    layer: int
    kind: str
    name: str
    columns: torch.Tensor | None  # dense input columns kept (needed for inputs="dense")


def projection_name(adapter: Any, layer: int, kind: str) -> str:
    return adapter.attention_names(layer).o if kind == "attention" else adapter.mlp_names(layer).down


def find_targets(pruned: nn.Module, dense: nn.Module, adapter: Any, which: Sequence[str],
                 columns: dict[str, torch.Tensor] | None, scope: str, need_columns: bool) -> list[Target]:
    """The projections to repair: with ``scope="pruned"`` those whose input width shrank, with ``"all"`` every
    attention/MLP output projection of the kinds in ``which``."""
    if scope not in ("pruned", "all"):
        raise ValueError(f"scope: {scope!r}; accepted: pruned, all")
    columns = columns or {}
    out = []
    for i in range(adapter.num_layers):
        for kind in which:
            name = projection_name(adapter, i, kind)
            p, d = pruned.get_submodule(name), dense.get_submodule(name)
            if p.out_features != d.out_features:
                raise ValueError(f"{name}: output width {p.out_features} differs from the dense {d.out_features}")
            shrunk = p.in_features != d.in_features
            if scope == "pruned" and not shrunk:  # a group that kept every unit is not repaired
                continue
            cols = columns.get(name)
            if cols is None and not shrunk:
                cols = torch.arange(d.in_features)
            if cols is None and need_columns:
                raise ValueError(f"{name} was pruned ({d.in_features} -> {p.in_features} inputs) but `columns` does "
                                 f"not say which inputs survived; pass columns=kept_columns(result) "
                                 f"(needed for inputs='dense')")
            if cols is not None and cols.numel() != p.in_features:
                raise ValueError(f"{name}: columns lists {cols.numel()} inputs, the pruned projection has "
                                 f"{p.in_features}")
            out.append(Target(i, kind, name, None if cols is None else cols.long()))
    return out


Solver = Callable[[Target, nn.Linear, Stats], dict]


@torch.no_grad()
def walk(pruned: nn.Module, dense: nn.Module, adapter: Any, batches: Sequence[torch.Tensor],
         targets: list[Target], solve: Solver, *, inputs: str, gram: bool,
         product_dtype: torch.dtype = torch.float64,
         fit_target: Callable[[nn.Linear, torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
    """Walk both models layer by layer, accumulate :class:`Stats` for each target with the chosen
    ``inputs`` ("sequential" or "dense") and let ``solve`` update the pruned projection. Returns one report
    per layer that has targets: ``{"layer", "seconds", <kind>: solve's report}``."""
    if inputs not in ("sequential", "dense"):
        raise ValueError(f"inputs: {inputs!r}; accepted: sequential, dense")
    if not batches:
        raise ValueError("repair needs calibration batches")
    check_not_offloaded(pruned, dense)
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    for ts in by_layer.values():
        ts.sort(key=lambda t: KINDS.index(t.kind))
    d_layers, p_layers = dense.get_submodule(adapter.layers_path), pruned.get_submodule(adapter.layers_path)
    last = max(by_layer) if by_layer else -1
    reports: list[dict] = []
    with _eval(pruned, dense):
        d_hidden, kwargs = first_layer_inputs(dense, d_layers, batches, per_layer_kwargs=True)
        p_hidden = None
        if inputs == "sequential":
            p_hidden, _ = first_layer_inputs(pruned, p_layers, batches, per_layer_kwargs=False)
        for i in range(last + 1):
            started = time.perf_counter()
            d_layer, p_layer = d_layers[i], p_layers[i]
            device = layer_device(d_layer)
            p_device = layer_device(p_layer)
            kw_d = [to_device(k[i], device) for k in kwargs]
            kw_p = [to_device(k[i], p_device) for k in kwargs] if p_hidden is not None else None
            layer_targets = by_layer.get(i, [])
            # dense pass: next dense hidden states, and the dense projections' inputs and outputs
            d_mods = {t.kind: dense.get_submodule(t.name) for t in layer_targets}
            stats = {t.kind: Stats(gram=gram, product_dtype=product_dtype) for t in layer_targets}
            dense_out: dict[str, list[torch.Tensor]] = {t.kind: [] for t in layer_targets}
            for b in range(len(batches)):
                stores = {k: {} for k in d_mods}
                with contextlib.ExitStack() as stack:
                    for k, mod in d_mods.items():
                        stack.enter_context(tap(mod, stores[k]))
                    d_hidden[b] = _run(d_layer, d_hidden[b].to(device), kw_d[b])
                for t in layer_targets:
                    x_d, y_d = stores[t.kind]["x"], stores[t.kind]["y"]
                    if inputs == "dense":
                        lin = pruned.get_submodule(t.name)
                        x = x_d.index_select(-1, t.columns.to(x_d.device)).to(lin.weight.device, lin.weight.dtype)
                        y = y_d.to(lin.weight.device)
                        stats[t.kind].add(x, y, lin(x), None if fit_target is None else fit_target(lin, y))
                    else:
                        dense_out[t.kind].append(y_d.float())
            if inputs == "sequential":
                for t in layer_targets:
                    lin = pruned.get_submodule(t.name)
                    for b in range(len(batches)):
                        store = _run_until(p_layer, p_hidden[b].to(p_device), kw_p[b], lin)
                        y = dense_out[t.kind][b].to(lin.weight.device)
                        stats[t.kind].add(store["x"], y, store["y"], None if fit_target is None else fit_target(lin, y))
                    dense_out[t.kind] = []
                    yield_report = solve(t, lin, stats[t.kind])
                    stats[t.kind].extra["report"] = yield_report
                for b in range(len(batches)):
                    p_hidden[b] = _run(p_layer, p_hidden[b].to(p_device), kw_p[b])
            else:
                for t in layer_targets:
                    stats[t.kind].extra["report"] = solve(t, pruned.get_submodule(t.name), stats[t.kind])
            if layer_targets:
                report = {"layer": i, "seconds": round(time.perf_counter() - started, 3)}
                for t in layer_targets:
                    report[t.kind] = stats[t.kind].extra["report"]
                reports.append(report)
    return reports


def ensure_bias(linear: nn.Linear) -> nn.Parameter:
    """``linear``'s bias, created as zeros (weight's dtype and device, same requires_grad) when it has none."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device),
                                   requires_grad=linear.weight.requires_grad)
    return linear.bias
