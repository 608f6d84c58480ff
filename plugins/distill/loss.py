"""The distillation loss on logits, in float32 chunks of positions.

Per position with a next-token target (padding masked out), with ``z`` the student's and ``u`` the teacher's logits::

    kd = T² · KL(softmax(u/T) ‖ softmax(z/T))        ce = -log softmax(z)[next token]
    loss = kl_weight · Σ KL(softmax(u/T) ‖ softmax(z/T)) + ce_weight · Σ ce

(the caller folds ``alpha · T²`` and the token count into ``kl_weight``, ``1 - alpha`` into ``ce_weight``).

Memory: the logits stay in their own dtype; only one chunk of positions (``CHUNK_ELEMENTS`` values) is ever
cast to float32. The gradient with respect to the student's logits is worked out chunk by chunk in the forward
pass, ``kl_weight · (softmax(z/T) - softmax(u/T)) / T + ce_weight · (softmax(z) - onehot)``, and written over
the teacher's logits (a no-grad tensor nobody else holds) when their dtypes agree, so the backward pass keeps
no float32 activations and no extra copy of the logits: at most the two logits tensors are alive at once, as
with the plain LM loss (which transformers computes on a float32 copy of the logits).
"""

from __future__ import annotations

import torch

# Values of one float32 chunk (positions × vocabulary): 2**24 = 64 MiB per float32 temporary.
CHUNK_ELEMENTS = 2**24


def shifted(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, targets)`` for logits at every position of ``labels`` ([batch, positions], -100 on padding): position
    ``i`` is scored when ``labels[:, i + 1]`` is a token, against that token (the last position never is)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    targets = torch.zeros_like(labels)
    targets[:, :-1] = labels[:, 1:].clamp(min=0)
    return mask, targets


def _rows(mask: torch.Tensor, vocab: int, chunk_elements: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (batch, position) indices of the masked positions, in chunks of at most ``chunk_elements // vocab``."""
    b, t = mask.nonzero(as_tuple=True)
    step = max(1, chunk_elements // vocab)
    return [(b[i:i + step], t[i:i + step]) for i in range(0, b.numel(), step)]


class _KDLoss(torch.autograd.Function):
    """Forward: the weighted loss and its two sums (KL, CE); the gradient is computed in the forward pass."""

    @staticmethod
    def forward(ctx, student, teacher, mask, targets, temperature, kl_weight, ce_weight, chunk_elements):
        with torch.no_grad(), torch.autocast(student.device.type, enabled=False):
            # the gradient's home: the teacher's logits when they can hold it, else a buffer in the student's dtype
            grad = teacher if teacher.dtype == student.dtype and teacher.shape == student.shape \
                and teacher.device == student.device else torch.empty_like(student)
            kl_sum = torch.zeros((), dtype=torch.float32, device=student.device)
            ce_sum = torch.zeros((), dtype=torch.float32, device=student.device)
            chunks = _rows(mask, student.shape[-1], chunk_elements)
            for b, t in chunks:
                z = student[b, t].float()
                log_q = torch.log_softmax(z / temperature, dim=-1)
                log_p = torch.log_softmax(teacher[b, t].float() / temperature, dim=-1)
                p = log_p.exp()
                kl_sum += (p * (log_p - log_q)).sum()
                g = (log_q.exp_() - p).mul_(kl_weight / temperature)  # d(kl_weight · KL)/dz
                del log_q, log_p, p
                if targets is not None:
                    log_s = torch.log_softmax(z, dim=-1)
                    y = targets[b, t].unsqueeze(-1)
                    ce_sum -= log_s.gather(-1, y).sum()
                    g.add_(log_s.exp_().scatter_add_(-1, y, torch.full_like(y, -1, dtype=log_s.dtype)),
                           alpha=ce_weight)
                    del log_s
                grad[b, t] = g.to(grad.dtype)
                del z, g
            grad[~mask] = 0  # padding and the last position: no target, no gradient
            loss = kl_weight * kl_sum + ce_weight * ce_sum
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        ctx.mark_non_differentiable(kl_sum, ce_sum)
        return loss, kl_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        (grad,) = ctx.saved_tensors
        out = grad.mul_(grad_loss.to(grad.dtype)) if grad_loss.numel() == 1 else grad * grad_loss
        return out.to(ctx.student_dtype), None, None, None, None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            targets: torch.Tensor | None = None, *, temperature: float = 1.0, kl_weight: float = 1.0,
            ce_weight: float = 0.0, chunk_elements: int = CHUNK_ELEMENTS
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kl_sum, ce_sum)`` over the positions where ``mask`` ([batch, positions], bool) is true.

    ``student_logits`` and ``teacher_logits`` are [batch, positions, vocab] in their own dtypes; the logits at
    position ``i`` are compared with ``targets[:, i]`` (the next token; needed when ``ce_weight`` is not 0), so
    the caller shifts the targets, not the logits. ``kl_sum`` is the plain Σ KL(teacher_T ‖ student_T) and
    ``ce_sum`` the Σ cross-entropy (float32, no gradient); ``loss`` is differentiable with respect to the
    student's logits only. **The teacher's logits are overwritten** (with the gradient) when their dtype and
    shape are the student's: pass a tensor you no longer need.
    """
    if not student_logits.requires_grad:  # evaluation: the same numbers without the gradient
        with torch.enable_grad():
            student_logits = student_logits.detach().requires_grad_(True)
            loss, kl, ce = _KDLoss.apply(student_logits, teacher_logits, mask, targets if ce_weight else None,
                                         float(temperature), float(kl_weight), float(ce_weight), chunk_elements)
        return loss.detach(), kl, ce
    return _KDLoss.apply(student_logits, teacher_logits, mask, targets if ce_weight else None, float(temperature),
                         float(kl_weight), float(ce_weight), chunk_elements)


def reference_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      targets: torch.Tensor | None = None, *, temperature: float = 1.0, kl_weight: float = 1.0,
                      ce_weight: float = 0.0) -> torch.Tensor:
    """The same loss written plainly in float32 over all positions at once (what the tests compare with)."""
    z, u = student_logits.float()[mask], teacher_logits.float()[mask]
    log_q = torch.log_softmax(z / temperature, -1)
    log_p = torch.log_softmax(u / temperature, -1)
    loss = kl_weight * (log_p.exp() * (log_p - log_q)).sum()
    if ce_weight:
        loss = loss + ce_weight * torch.nn.functional.cross_entropy(z, targets[mask], reduction="sum")
    return loss
