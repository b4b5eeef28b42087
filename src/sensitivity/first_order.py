"""grad_squared, grad_x_weight and act_mag from one forward+backward per batch (a shared pass).

grad_squared's per-sample path (src/sensitivity/fisher.py) already holds, for every scored
layer, its input x and the output gradient δ of Σ_s L_s (L_s the token-mean NLL of sequence s).
The same two tensors give the other two metrics without another pass:

* the mean gradient ḡ = ∂L/∂w of the token-mean NLL over all calibration tokens (N of them) is
  Σ_s (n_s / N) ∂L_s/∂w = Σ_s (n_s / N) δ_sᵀ x_s (n_s: sequence s's predicted tokens), one
  weighted matmul per layer; grad_x_weight = |ḡ ⊙ w|;
* act_mag's input-channel sums of squares Σ_t x_tj² over the real tokens.

It runs when grad_squared and at least one of the others are scored together (compute_many), in
one process (torchrun splits the first-order metrics' batches but not grad_squared's) and when
the per-sample path applies; otherwise each metric runs its own pass. The results equal the
separate passes' up to float32 summation order.
"""
from __future__ import annotations

import torch

from src.sensitivity.activation import act_mag_output, column_sumsq
from src.sensitivity.fisher import fisher_output, per_sample_fisher, single_use_linear_owners
from src.sensitivity.metrics import register_shared_pass
from src.sensitivity.scoring import MetricOutput, Scores, ScoringJob, zeros_like_fp32

MEMBERS = ("grad_squared", "grad_x_weight", "act_mag")


@register_shared_pass(MEMBERS)
def shared_first_order(job: ScoringJob, wanted: tuple[str, ...]) -> dict[str, MetricOutput] | None:
    if "grad_squared" not in wanted:  # the pass is grad_squared's: the others ride along
        return None
    joint = first_order_pass(job, wanted, keep_mean_gradient=False)
    return None if joint is None else joint[0]


def first_order_pass(job: ScoringJob, wanted, keep_mean_gradient: bool
                     ) -> tuple[dict[str, MetricOutput], Scores | None] | None:
    """({name: output} for ``wanted`` among MEMBERS, ḡ when ``keep_mean_gradient``) from one
    per-sample pass, or None when it cannot run here (see the module docstring)."""
    if job.ranks.distributed:
        return None
    owners = single_use_linear_owners(job.model, job.params)
    if owners is None:
        return None
    kinds = {name: kind for name, (_, kind) in owners.items()}
    need_gradient = keep_mean_gradient or "grad_x_weight" in wanted
    mean_grad = zeros_like_fp32(job.params) if need_gradient else None
    sumsq = {name: torch.zeros(_input_channels(p, kinds[name]), dtype=torch.float32,
                               device=p.device) for name, p in job.params.items()} \
        if "act_mag" in wanted else None
    fisher = per_sample_fisher(job, also=(_fold(job, mean_grad, sumsq),))
    if fisher is None:
        return None
    outputs = {}
    if "grad_squared" in wanted:
        outputs["grad_squared"] = fisher_output(job, fisher)
    del fisher
    if "act_mag" in wanted:
        outputs["act_mag"] = act_mag_output(job, kinds, sumsq)
    if "grad_x_weight" in wanted:
        outputs["grad_x_weight"] = MetricOutput({
            name: (mean_grad[name].clone() if keep_mean_gradient else mean_grad[name])
            .mul_(p.detach()).abs_() for name, p in job.params.items()})
    return outputs, (mean_grad if keep_mean_gradient else None)


def _fold(job: ScoringJob, mean_grad: Scores | None, sumsq: dict | None):
    """The fold called with each layer's input and output gradient (fisher.py's ``also``)."""
    total_tokens = job.blocks.n_predicted_tokens()
    padded = not bool(job.blocks.attention_mask.all())  # checked once, on the host

    def fold(name, kind, x, grad_output, batch):
        if mean_grad is not None:
            mean_grad[name].add_(_weighted_gradient(x, grad_output, kind,
                                                    _sequence_shares(batch, total_tokens)))
        if sumsq is not None:
            mask = batch.attention_mask if padded else None
            sumsq[name].add_(column_sumsq(x, mask).to(sumsq[name].device))
    return fold


def _sequence_shares(batch, total_tokens: int) -> torch.Tensor:
    """n_s / N per sequence of the batch: its predicted tokens over all calibration tokens."""
    mask = batch.attention_mask
    return (mask[:, 1:] * mask[:, :-1]).sum(dim=1).to(torch.float32) / total_tokens


def _weighted_gradient(x: torch.Tensor, grad_output: torch.Tensor, kind: str,
                       shares: torch.Tensor) -> torch.Tensor:
    """Σ_s share_s · δ_sᵀ x_s ([out, in], Linear) or x_sᵀ δ_s ([in, out], Conv1D), float32."""
    n = x.shape[0]
    x = x.to(grad_output.device).reshape(n, -1, x.shape[-1]).float()
    delta = grad_output.reshape(n, -1, grad_output.shape[-1]).float()
    delta = delta * shares.to(delta.device).view(n, 1, 1)
    x, delta = x.reshape(-1, x.shape[-1]), delta.reshape(-1, delta.shape[-1])
    return delta.T @ x if kind == "linear" else x.T @ delta


def _input_channels(weight: torch.Tensor, kind: str) -> int:
    return weight.shape[1] if kind == "linear" else weight.shape[0]
