"""act_mag: |W_ij| · ‖X_j‖₂ over the calibration tokens (Wanda)."""
from __future__ import annotations

import torch

from src.distributed.sharding import local, local_rows, without_grad
from src.errors import UserError
from src.sensitivity.metrics import register
from src.sensitivity.scoring import MetricOutput, ScoringJob, batches, owner_layers


@register("act_mag", uses_data=True, description="|W| x input-channel L2 norm (Wanda)",
          shardable=True)
def act_mag(job: ScoringJob) -> MetricOutput:
    owners = _owner_modules(job.model, job.params)
    sumsq = {}
    current_mask = {}
    handles = []
    for name, (module, kind) in owners.items():
        sumsq[name] = torch.zeros(_n_input_channels(job.params[name], kind), dtype=torch.float32,
                                  device=job.params[name].device)
        handles.append(module.register_forward_hook(
            _input_norm_hook(sumsq[name], kind, current_mask)))
    padded = not bool(job.blocks.attention_mask.all())  # checked once, on the host
    try:
        with without_grad(job.ranks.sharded):
            for batch in batches(job, "act_mag"):
                current_mask.clear()
                current_mask["mask"] = batch.attention_mask if padded else None
                current_mask["skip"] = not batch.counted
                job.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    job.ranks.sum_(sumsq.values())
    return act_mag_output(job, {name: kind for name, (_, kind) in owners.items()}, sumsq)


def act_mag_output(job: ScoringJob, kinds: dict[str, str], sumsq: dict) -> MetricOutput:
    """|W_ij| · sqrt(Σ x_j²) from each weight's input-channel sums of squares (over all
    processes) and its layer kind (linear, conv1d, embedding)."""
    scores = {}
    for name, p in job.params.items():
        norm = sumsq[name].sqrt()
        if kinds[name] == "linear":  # input channels are columns: every rank has them all
            norm = norm.view(1, -1)
        else:  # Conv1D, embedding: input channels are rows, cut like the weight
            rows = local_rows(p)
            norm = norm[rows.start:rows.stop].view(-1, 1)
        scores[name] = local(p).detach().abs().float().mul_(norm)
    return MetricOutput(scores)


def _owner_modules(model, params) -> dict[str, tuple[torch.nn.Module, str]]:
    """name -> the first layer holding the weight, whose input act_mag measures."""
    owners = {}
    for name, found in owner_layers(model, params).items():
        module, kind = found[0]
        if kind is None:
            raise UserError(f"act_mag does not support {type(module).__name__} weights ({name}); "
                            f"choose another metric")
        owners[name] = (module, kind)
    missing = set(params) - set(owners)
    if missing:
        raise UserError(f"act_mag: no layer owns {sorted(missing)[0]} as its weight")
    return owners


def _n_input_channels(weight, kind) -> int:
    return {"linear": weight.shape[1], "conv1d": weight.shape[0], "embedding": weight.shape[0]}[kind]


def _input_norm_hook(sumsq: torch.Tensor, kind: str, state: dict):
    """Forward hook adding Σ_t x_tj² over real tokens to ``sumsq``. ``state`` holds the batch's
    mask (None without padding) and the last input seen: layers fed the same tensor (q/k/v,
    gate/up) reuse its column sums instead of recomputing them."""
    def hook(module, inputs, output):
        if state.get("skip"):
            return
        x = inputs[0]
        mask = state.get("mask")
        if kind == "embedding":
            index = x[mask.bool()] if mask is not None and mask.shape == x.shape else x.reshape(-1)
            sumsq.add_(torch.bincount(index.reshape(-1), minlength=sumsq.numel()).float())
            return
        if state.get("input") is not x:
            state["input"], state["column_sumsq"] = x, column_sumsq(x, mask)
        sumsq.add_(state["column_sumsq"].to(sumsq.device))
    return hook


def column_sumsq(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """float32 Σ over tokens of x² per input channel; tokens with mask 0 left out."""
    if mask is not None and mask.shape != x.shape[:-1]:
        mask = None  # the layer does not see [batch, tokens, channels]: every row counts
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows * mask.reshape(-1, 1).to(rows.device, rows.dtype)
    if rows.is_cuda:  # one fused low-precision -> float32 reduction
        norm = torch.linalg.vector_norm(rows, dim=0, dtype=torch.float32)
        return norm * norm
    return rows.float().square().sum(dim=0)
