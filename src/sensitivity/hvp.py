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

Memory per group: a copy of its weights and the gradients g₊ of the current probe (in the
weights' dtype), besides the moments; probes are drawn again per tensor where needed, each
sample is formed and folded as soon as its g₋ is ready, and no autograd graph outlives a
backward.
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
    rounding would leave unchanged moves one ulp towards the direction (decided per element on
    the device: no host synchronisation)."""
    wide = original.to(accumulation_dtype(original.dtype))
    moved = wide.add(direction.to(wide.dtype), alpha=epsilon).to(original.dtype)
    towards = direction.to(original.dtype) * torch.finfo(original.dtype).max
    return torch.where(moved == original, torch.nextafter(original, towards), moved)


def restore(group: dict, originals: dict) -> None:
    """Copy the original weights back (bit for bit)."""
    with torch.no_grad():
        for name, p in group.items():
            local(p).copy_(originals[name])


class CentralDifference:
    """The samples Δg / Δw of one group at one probe, tensor by tensor (see the module
    docstring): ``forward_pass`` sets every weight to w₊ and keeps each gradient g₊ as it is
    produced (in its own dtype: no wider copy); ``backward_pass`` sets w₋ and, as each gradient
    g₋ is produced, hands ``fold(name, sample)`` the tensor's sample and frees its g₊. The probe
    of a tensor is drawn again where it is needed, never held for the whole group."""

    def __init__(self, group: dict, originals: dict, epsilon: dict, probe):
        self.group, self.originals, self.epsilon, self.probe = group, originals, epsilon, probe
        self.plus: dict[str, torch.Tensor] = {}

    def shifted(self, name: str, sign: int) -> torch.Tensor:
        return perturbed(self.originals[name], self.epsilon[name], self.probe(name) * sign)

    def set_weights(self, sign: int) -> None:
        with torch.no_grad():
            for name, p in self.group.items():
                local(p).copy_(self.shifted(name, sign))

    def forward_pass(self, loss_fn) -> None:
        self.set_weights(1)

        def keep(name, grad):
            self.plus[name] = grad

        with fold_gradients(self.group, keep):
            loss_fn().backward()

    def backward_pass(self, loss_fn, fold) -> None:
        self.set_weights(-1)
        wide = accumulation_dtype

        def sample(name, grad):
            minus_weight = local(self.group[name]).detach()
            step = self.shifted(name, 1).to(wide(grad.dtype)).sub_(minus_weight)
            difference = self.plus.pop(name).to(wide(grad.dtype), copy=True).sub_(grad)
            fold(name, difference.div_(step))

        with fold_gradients(self.group, sample):
            loss_fn().backward()


def finite_difference_group(job, group: dict, stats: dict, probe_indices: range,
                            total_tokens: int, batches) -> None:
    """Fold the samples Δg / Δw of every batch and of its probes ``probe_indices`` into
    ``stats`` (one WeightedWelford per weight of ``group``, rows held here), weighted by the
    batch's share of tokens. The weights are restored bit for bit afterwards, also after an
    error."""
    originals = {n: local(p).detach().clone() for n, p in group.items()}
    epsilon = step_sizes(group, job.ranks)
    try:
        for batch in batches:
            n_tokens = batch.n_predicted_tokens()
            weight = n_tokens / total_tokens

            def loss_fn(batch=batch, n_tokens=n_tokens):
                return loss_sum(job.model, batch.input_ids, batch.attention_mask) * \
                    (batch.loss_factor / n_tokens)

            def fold(name, sample, counted=batch.counted, weight=weight):
                if counted:  # a padding pass only keeps sharded ranks in step
                    stats[name].update(sample, weight)

            for probe_index in probe_indices:
                def probe(name, index=batch.index, probe_index=probe_index):
                    return local_probe(group[name], job.seed, name, index, probe_index)

                difference = CentralDifference(group, originals, epsilon, probe)
                difference.forward_pass(loss_fn)
                difference.backward_pass(loss_fn, fold)
    finally:
        restore(group, originals)
