"""Gradients at randomly perturbed weights without a perturbed copy of the model: seeded noise, a perturbed-linear
autograd function, and the in-place variant."""

from __future__ import annotations

import contextlib
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from prunekit.builtin.moreau.descent import backward_calibration, pull_back
from prunekit.builtin.moreau.prox import Tensors
from prunekit.importance.base import ScoringContext, check_finite
from prunekit.importance.precision import GradAccumulator, GradientOverflow, LossScale, finite


def noise_seed(seed: int, step: int, sample: int, index: int) -> int:
    """A 63-bit generator seed for one tensor's noise at one step, stable across runs and platforms."""
    digest = hashlib.blake2b(f"moreau:{seed}:{step}:{sample}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def standard_noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    """z ~ N(0, 1) shaped like ``like`` from a generator seeded with ``seed`` (same bits every call).

    The weight noise is ε = σ·w·z: sign(w)·z is standard normal again, so this is N(0, (σ|w|)²)
    without materialising |w|. Always float32 (the perturbed weights are float32 whatever the model's dtype).
    """
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=torch.float32)


def parallel_map(fn: Callable, items: list) -> list:
    """``[fn(x) for x in items]`` on torch's thread count: the CPU Gaussian generator is single-threaded
    and releases the GIL, and every tensor has its own seeded generator, so results do not depend on it."""
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


class _PerturbedLinear(torch.autograd.Function):
    """y = x·W'ᵀ + b for a prebuilt perturbed weight W'; the backward adds scale·∂L/∂W' straight into δ.

    The gradient w.r.t. W' is the gradient w.r.t. δ, so the proximal step's -γ·∇L term is one ``addmm_``
    into δ: no weight gradient is ever allocated. ``anchor`` is a scalar leaf that makes autograd run this
    backward even where nothing upstream needs a gradient (the first layer). W' and δ are float32; in a
    bf16/fp16 model the activations are upcast for this Linear's products and the output cast back, so
    δ (often far below |w|·2⁻⁸) is not rounded away (docs/precision.md). In a float32 model every cast is a no-op.
    """

    @staticmethod
    def forward(ctx, x, anchor, w_eff, delta, bias, scale):
        ctx.save_for_backward(x)
        ctx.w_eff, ctx.delta, ctx.scale = w_eff, delta, scale
        wide = w_eff.dtype
        return torch.nn.functional.linear(x.to(wide), w_eff, None if bias is None else bias.to(wide)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        wide = ctx.w_eff.dtype
        grad_x = (grad_y.to(wide) @ ctx.w_eff).to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        rows = grad_y.reshape(-1, grad_y.shape[-1])
        ctx.delta.addmm_(rows.t().to(wide), x.reshape(-1, x.shape[-1]).to(wide), alpha=ctx.scale)
        grad_bias = rows.sum(0) if ctx.needs_input_grad[4] else None
        ctx.w_eff = ctx.delta = None
        return grad_x, None, None, None, grad_bias, None


def linear_modules(model: torch.nn.Module, names) -> dict[str, torch.nn.Linear] | None:
    """The nn.Linear owning each ``<module>.weight`` name, or None if some name is not such a weight."""
    out = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            return None
        if leaf != "weight" or not isinstance(module, torch.nn.Linear) \
                or type(module).forward is not torch.nn.Linear.forward or "forward" in module.__dict__:
            return None  # a subclass or a wrapped forward (hooks, adapters): perturb in place instead
        out[name] = module
    return out


@dataclass
class PerturbedStep:
    """One proximal-gradient step δ ← δ·(1 - γ/ρ) - γ·∇L(w + ε + δ) for prunable nn.Linear weights.

    W' = w + σ·w·z + δ is built once per step for every scope Linear (in parallel across tensors) and
    shared by every calibration micro-batch; each Linear's forward is swapped, for the step only, for
    :class:`_PerturbedLinear`, whose backward accumulates -γ·∂L/∂W' into δ. The parameters are never
    written and get no ``.grad``. State: δ, W' and the caller's running mean; no gradient buffer.
    """

    ctx: ScoringContext
    modules: dict[str, torch.nn.Linear]
    sigma: float
    seed: int
    noise_samples: int
    step: float
    rho: float | None
    resample_calibration: bool = False
    losses: list[float] = field(default_factory=list)
    loss_scale: LossScale = field(default_factory=lambda: LossScale(False))

    def __call__(self, delta: Tensors, t: int) -> None:
        """Move δ to v in place, the gradient averaged over ``noise_samples`` draws of ε."""
        batches = self.ctx.draw_batches(t) if self.resample_calibration else None
        weights = self.build(delta, t)
        pull_back(delta, self.step, self.rho)
        scale = -self.step / self.noise_samples
        if self.loss_scale.enabled:  # float16: the backward is scaled, its sum into δ unscaled (a power of two)
            scale /= self.loss_scale.value
        anchor = torch.zeros((), requires_grad=True)
        total = 0.0
        for sample in range(self.noise_samples):
            if sample:
                self.resample(weights, t, sample)
            with self.routed(weights, delta, anchor, scale):
                total += backward_calibration(self.ctx, t, batches, self.loss_scale)
        del weights
        for name, d in delta.items():
            if self.loss_scale.enabled and not finite(d):
                raise GradientOverflow(f"float16 gradient of {name} overflowed at loss scale {self.loss_scale.value:g}")
            check_finite(d, f"gradient of {name}", t + 1)
        self.losses.append(total / self.noise_samples)

    def build(self, delta: Tensors, t: int) -> Tensors:
        """W' = w + σ·w·z₀ + δ for every scope Linear (z₀ from the tensor's seed for step t, sample 0)."""

        def one(item: tuple[int, tuple[str, torch.nn.Linear]]) -> torch.Tensor:
            index, (name, module) = item
            w = module.weight.detach().float()  # the weight itself in a float32 model, a transient copy otherwise
            if self.sigma == 0:
                return torch.add(w, delta[name])
            z = standard_noise(w, noise_seed(self.seed, t, 0, index))
            return torch.addcmul(w, w, z, value=self.sigma, out=z).add_(delta[name])

        return dict(zip(self.modules, parallel_map(one, list(enumerate(self.modules.items())))))

    def resample(self, weights: Tensors, t: int, sample: int) -> None:
        """Swap the previous draw's noise in W' for this draw's: W' += σ·w·(z_s - z_{s-1})."""
        if self.sigma == 0:
            return

        def one(item: tuple[int, tuple[str, torch.nn.Linear]]) -> None:
            index, (name, module) = item
            w = module.weight.detach().float()
            weights[name].addcmul_(w, standard_noise(w, noise_seed(self.seed, t, sample - 1, index)), value=-self.sigma)
            weights[name].addcmul_(w, standard_noise(w, noise_seed(self.seed, t, sample, index)), value=self.sigma)

        parallel_map(one, list(enumerate(self.modules.items())))

    @contextlib.contextmanager
    def routed(self, weights: Tensors, delta: Tensors, anchor: torch.Tensor, scale: float) -> Iterator[None]:
        """Route every scope Linear through :class:`_PerturbedLinear`; put the old forwards back after."""
        saved = []
        try:
            for name, module in self.modules.items():
                saved.append((module, module.__dict__.get("forward")))
                module.forward = self._forward(module, anchor, weights[name], delta[name], scale)
            yield
        finally:
            for module, previous in saved:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    @staticmethod
    def _forward(module: torch.nn.Linear, anchor: torch.Tensor, w_eff: torch.Tensor, delta: torch.Tensor,
                 scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return _PerturbedLinear.apply(x, anchor, w_eff, delta, module.bias, scale)

        return forward


@dataclass
class InPlacePerturbedGradient:
    """∇L(w + ε + δ) for any scope parameters, perturbing them in place and restoring w bit-exactly.

    Used by reference mode (δ and noise on every parameter, embeddings and norms included) and by math
    mode when a scope tensor is not an nn.Linear weight. ``originals`` holds one float32 copy of every
    scope parameter; restoring copies it back, so no rounding accumulates across iterations
    (subtracting ε + δ again would not be exact).
    """

    ctx: ScoringContext
    params: dict[str, torch.nn.Parameter]
    sigma: float
    seed: int
    noise_samples: int
    resample_calibration: bool = False
    originals: Tensors = field(init=False)
    losses: list[float] = field(default_factory=list)
    loss_scale: LossScale = field(default_factory=lambda: LossScale(False))

    def __post_init__(self) -> None:
        self.originals = {n: p.detach().clone() for n, p in self.params.items()}

    def __call__(self, delta: Tensors, step: int) -> Tensors:
        """Mean float32 gradient over ``noise_samples`` draws of ε (each over all calibration batches).

        Gradients are summed in float32 per parameter as autograd produces them (:class:`GradAccumulator`);
        in a bf16/fp16 model the perturbed weight w + ε + δ is rounded to the model's dtype (reference mode
        and non-Linear weights only; docs/precision.md)."""
        total = 0.0
        batches = self.ctx.draw_batches(step) if self.resample_calibration else None
        accumulator = GradAccumulator(self.params, self.loss_scale)
        try:
            with accumulator:
                for sample in range(self.noise_samples):
                    self.perturb(delta, step, sample)
                    total += self.backward(step, batches)
                    accumulator.check_overflow()
        finally:
            self.restore()
        grads = accumulator.result()  # zeros for a parameter the loss does not reach
        for name, g in grads.items():
            if self.noise_samples > 1:
                g.div_(self.noise_samples)
            check_finite(g, f"gradient of {name}", step + 1)
        self.losses.append(total / self.noise_samples)
        return grads

    @torch.no_grad()
    def perturb(self, delta: Tensors, step: int, sample: int) -> None:
        """Set every scope parameter to w + σ·w·z + δ, z drawn from a per-tensor seeded generator."""
        for index, (name, p) in enumerate(self.params.items()):
            w = self.originals[name]
            if p.dtype != torch.float32:  # perturbed in float32, rounded once into the model's dtype
                wide = w.float()
                if self.sigma > 0:
                    wide.addcmul_(wide, standard_noise(w, noise_seed(self.seed, step, sample, index)), value=self.sigma)
                p.copy_(wide.add_(delta[name]) if name in delta else wide)
                continue
            p.copy_(w)
            if self.sigma > 0:
                p.addcmul_(w, standard_noise(w, noise_seed(self.seed, step, sample, index)), value=self.sigma)
            if name in delta:
                p.add_(delta[name])

    def backward(self, step: int, batches: list[torch.Tensor] | None = None) -> float:
        """Backpropagate the calibration loss (the accumulator takes the gradients); returns the mean loss."""
        return backward_calibration(self.ctx, step, batches, self.loss_scale)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back, bit for bit."""
        for name, p in self.params.items():
            p.copy_(self.originals[name])
