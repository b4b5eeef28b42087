"""Probes and the finite-difference Hessian-vector product of hutchinson_diag.

Probes: a Rademacher z per (seed, weight name, batch index, probe index), drawn for the whole
tensor and cut to the rows held here, so a sharded run uses the single-process probes.

Central differences: g(w + εz) - g(w - εz) = H (Δw) + O(ε³), g the gradient of a batch's loss.
Only plain backward passes (fused attention kernels allowed, no first-order graph kept): the
weights of the group are set in place to w ± εz, each pass's gradient is folded into a buffer as
soon as it is ready (float32, or the weight's dtype when wider), and the original weights are
copied back bit for bit afterwards (from a copy kept for the group, also after an error).

The sample of weight i is the secant slope of its own gradient, Δg_i / Δw_i, with Δw = w₊ - w₋
the step actually taken after rounding to the weight's dtype (z_i Δw_i > 0). Since Δw_i depends
on z_i only through its sign, E[Δg_i / Δw_i] = H_ii exactly (the off-diagonal terms H_ij Δw_j
have zero mean): rounding of w ± εz biases nothing. A weight that w ± εz would leave unchanged
(|w_i| ≫ ε in a low-precision dtype) moves one ulp towards ±z instead, so Δw_i is never 0.
With one ε for all tensors the sample is the double backward's z_i (H z)_i; with ε per tensor
the cross terms are H_ij Δw_j / Δw_i (still zero-mean), which rescaling a tensor leaves unchanged.

Step size ε per tensor: h · rms(w), h = eps(dtype)^(1/3). The central difference's truncation
error grows as ε² (third derivatives), its rounding error as eps·|g|/ε (the gradient is computed
in the weight's dtype); their sum is smallest at ε ∝ eps^(1/3) in the units of the weight, and
rms(w) is that unit (a scale-free choice: scaling a tensor scales its ε). Under --shard the rms
is of the whole tensor (sums of squares added over ranks), so ε is the single-process ε.

Memory per group: a copy of its weights, the current probe (weight dtype) and a gradient
difference (float32), besides the moments; no autograd graph outlives a backward.
"""
from __future__ import annotations

import torch

from src.distributed.sharding import held_rows, local
from src.sensitivity.scoring import fold_gradients, loss_sum
from src.utils.seeds import generator_for


def rademacher_like(param: torch.Tensor, seed: int, name: str, batch_index: int,
                    probe_index: int) -> torch.Tensor:
    generator = generator_for(param.device, seed, name, batch_index, probe_index)
    signs = torch.randint(0, 2, param.shape, generator=generator, device=param.device,
                          dtype=torch.int8)
    return (signs * 2 - 1).to(param.dtype)


def local_probe(param, seed: int, name: str, batch_index: int, probe_index: int):
    """The probe's rows held here (all of them in one process)."""
    return held_rows(rademacher_like(param, seed, name, batch_index, probe_index), param)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the weight's dtype when wider (a float64 model keeps float64 differences)."""
    return torch.promote_types(dtype, torch.float32)


def step_sizes(group: dict, ranks) -> dict[str, float]:
    """ε per tensor of ``group``: eps(dtype)^(1/3) · rms of the whole tensor (1 for zeros)."""
    squares = [torch.linalg.vector_norm(local(p).detach(), dtype=torch.float64).square()
               for p in group.values()]
    totals = ranks.reduced(squares) if ranks.sharded else torch.stack(squares).cpu()
    sizes = {}
    for (name, p), total in zip(group.items(), totals.tolist()):
        rms = (total / p.numel()) ** 0.5 if p.numel() else 0.0
        sizes[name] = torch.finfo(p.dtype).eps ** (1 / 3) * (rms if rms > 0 else 1.0)
    return sizes


def perturbed(original: torch.Tensor, epsilon: float, direction: torch.Tensor) -> torch.Tensor:
    """original + ε·direction (direction ±1) rounded to original's dtype; an element that
    rounding would leave unchanged moves one ulp towards the direction."""
    wide = original.to(accumulation_dtype(original.dtype))
    moved = wide.add(direction.to(wide.dtype), alpha=epsilon).to(original.dtype)
    stuck = moved == original
    if bool(stuck.any()):
        towards = torch.full_like(original, torch.finfo(original.dtype).max) * direction
        moved = torch.where(stuck, torch.nextafter(original, towards), moved)
    return moved


def restore(group: dict, originals: dict) -> None:
    """Copy the original weights back (bit for bit)."""
    with torch.no_grad():
        for name, p in group.items():
            local(p).copy_(originals[name])


def gradient_at(group: dict, values: dict, loss_fn) -> dict:
    """Gradient of ``loss_fn()`` (rows held here, accumulation dtype) with each weight of
    ``group`` set to ``values[name]``."""
    with torch.no_grad():
        for name, p in group.items():
            local(p).copy_(values[name])
    grads = {}

    def fold(name, grad):
        grads[name] = grad.to(accumulation_dtype(grad.dtype), copy=True)

    with fold_gradients(group, fold):
        loss_fn().backward()
    return grads


def central_difference(group: dict, originals: dict, epsilon: dict, probes: dict, loss_fn):
    """(Δg, Δw) per tensor: Δg = g(w₊) - g(w₋) ≈ H Δw with w± = ``perturbed``(w, ε, ±z)."""
    difference, step = {}, {}
    try:
        for sign in (1, -1):
            values = {n: perturbed(originals[n], epsilon[n], probes[n] * sign) for n in group}
            grads = gradient_at(group, values, loss_fn)
            for name, value in values.items():
                wide = value.to(accumulation_dtype(value.dtype))
                if sign == 1:
                    difference[name], step[name] = grads[name], wide
                else:
                    difference[name].sub_(grads[name])
                    step[name].sub_(wide)
    finally:
        restore(group, originals)
    return difference, step


def finite_difference_group(job, group: dict, stats: dict, n_probes: int,
                            total_tokens: int, batches) -> None:
    """Fold the samples Δg / Δw of every batch and probe into ``stats`` (one WeightedWelford per
    weight of ``group``, rows held here), weighted by the batch's share of tokens."""
    originals = {n: local(p).detach().clone() for n, p in group.items()}
    epsilon = step_sizes(group, job.ranks)
    for batch in batches:
        n_tokens = batch.n_predicted_tokens()

        def loss_fn(batch=batch, n_tokens=n_tokens):
            return loss_sum(job.model, batch.input_ids, batch.attention_mask) * \
                (batch.loss_factor / n_tokens)

        for probe_index in range(n_probes):
            probes = {n: local_probe(p, job.seed, n, batch.index, probe_index)
                      for n, p in group.items()}
            difference, step = central_difference(group, originals, epsilon, probes, loss_fn)
            if batch.counted:  # a padding pass only keeps sharded ranks in step
                for name in group:
                    stats[name].update(difference[name].div_(step[name]),
                                       n_tokens / total_tokens / n_probes)
