"""grad_squared: the empirical Fisher diagonal, from per-sequence gradients."""
from __future__ import annotations

import torch

from src.distributed.sharding import local_rows
from src.eval.perplexity import token_nll
from src.sensitivity.metrics import register
from src.sensitivity.scoring import (MetricOutput, Scores, ScoringJob, batches, fold_gradients,
                                     gradients_only_on, owner_layers, recomputing,
                                     zeros_like_fp32)


@register("grad_squared", uses_data=True, description="empirical Fisher diagonal",
          shardable=True, gradients=True)
def grad_squared(job: ScoringJob) -> MetricOutput:
    """Mean over sequences s of (∂L_s/∂w)², L_s = token-mean NLL of sequence s.

    Fast path (every scored weight belongs to one Linear / Conv1D layer called once per forward):
    one backward per batch of Σ_s L_s; each layer's per-sequence gradients δ_sᵀ x_s come from its
    saved input x and output gradient δ (a batched matmul, the work autograd would do for the
    summed gradient), and their squares are summed in float32 right away. Otherwise one backward
    per sequence.

    Under --shard every rank runs every batch (a square of a sum over ranks is not a sum of
    squares) and computes the per-sequence gradients of its own rows only."""
    fisher = per_sample_fisher(job)
    if fisher is None:  # e.g. a layer applied twice per forward: one backward per sequence
        fisher = zeros_like_fp32(job.params)
        _per_sequence_squared_grads(job, fisher)
    return fisher_output(job, fisher)


def per_sample_fisher(job: ScoringJob, also=()) -> Scores | None:
    """Σ_s (∂L_s/∂w)² of every scored weight by the one-backward-per-batch path (``also``: see
    ``_per_sample_squared_grads``), or None when the model's layers do not allow it."""
    owners = single_use_linear_owners(job.model, job.params)
    if owners is None:
        return None
    fisher = zeros_like_fp32(job.params)
    try:
        _per_sample_squared_grads(job, owners, fisher, also)
    except _NotPerSample:
        return None
    return fisher


def fisher_output(job: ScoringJob, fisher: Scores) -> MetricOutput:
    """grad_squared's output from the sums of squares: summed over the processes, divided by
    the number of sequences (in place)."""
    job.ranks.sum_gradients_(fisher.values())  # sharded: each rank has its rows' whole sums
    n_sequences = max(len(job.blocks), 1)
    return MetricOutput({n: f.div_(n_sequences) for n, f in fisher.items()})


class _NotPerSample(Exception):
    """The model's layers do not map one input row to one sequence: use the per-sequence path."""


PER_SAMPLE_CHUNK_ELEMENTS = 1 << 28  # per-sequence gradients materialised at once (elements)


def _sequence_mean_loss_sum(model, input_ids, attention_mask) -> torch.Tensor:
    """Σ_s L_s over the batch, L_s = token-mean NLL of sequence s (0 for a sequence w/o tokens)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    nll, valid = token_nll(logits, input_ids, attention_mask)
    per_sequence = (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    return per_sequence.sum()


def _per_sequence_squared_grads(job: ScoringJob, fisher: Scores) -> None:
    def fold(name, grad):  # fp32 square of the stored-dtype gradient, no float copy
        fisher[name].addcmul_(grad, grad)

    # sharded: every rank runs the same sequences, so FSDP's mean over ranks is the gradient
    with gradients_only_on(job.model, job.params), fold_gradients(job.params, fold):
        for batch in batches(job, "grad_squared", own_gradients=True):
            for row in range(batch.input_ids.shape[0]):  # one backward per sequence
                _sequence_mean_loss_sum(job.model, batch.input_ids[row:row + 1],
                                        batch.attention_mask[row:row + 1]).backward()


def single_use_linear_owners(model, params) -> dict | None:
    """name -> (module, kind) when each scored weight is the weight of exactly one Linear or
    Conv1D layer (no tied or foreign uses), else None."""
    owners = owner_layers(model, params)
    if set(owners) != set(params) or any(len(found) != 1 or found[0][1] not in ("linear", "conv1d")
                                         for found in owners.values()):
        return None
    return {name: found[0] for name, found in owners.items()}


def _per_sample_squared_grads(job: ScoringJob, owners: dict, fisher: Scores,
                              also=()) -> None:
    """Fold Σ_s (∂L_s/∂W)² of every owner layer into ``fisher``, one backward per batch.

    The weights themselves do not require grad (no summed weight gradient is computed); the
    first scored layer's input is made to require grad so that the backward reaches every layer.
    ``also``: further folds ``fold(name, kind, x, grad_output, batch)`` of each layer's input x
    and output gradient δ of Σ_s L_s (rows held here), called as each δ is ready (src/sensitivity/
    first_order.py: the mean gradient and act_mag's input norms from the same pass).
    """
    pending: dict = {}
    batch_rows = {}

    def before(module, args):  # also in a checkpointed block's second forward: same graph
        x = args[0]
        if x.shape[0] != batch_rows["n"]:
            raise _NotPerSample
        if not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def after(module, args, output):
        if recomputing():  # a checkpointed block's second forward: recorded the first time
            return
        if module in pending:
            raise _NotPerSample
        name, kind = names[module]
        pending[module] = args[0].detach()

        def on_grad(grad_output, module=module, name=name, kind=kind):
            x = pending.pop(module)
            rows = local_rows(job.params[name])  # the weight's rows: out (Linear), in (Conv1D)
            if kind == "linear":
                grad_output = grad_output[..., rows.start:rows.stop]
            else:
                x = x[..., rows.start:rows.stop]
            _fold_per_sample_squares(fisher[name], x, grad_output, kind)
            for fold in also:
                fold(name, kind, x, grad_output, batch_rows["batch"])
        output.register_hook(on_grad)

    names = {module: (name, kind) for name, (module, kind) in owners.items()}
    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    try:
        with gradients_only_on(job.model, {}):
            for batch in batches(job, "grad_squared", own_gradients=True):
                pending.clear()
                batch_rows["n"], batch_rows["batch"] = batch.input_ids.shape[0], batch
                _sequence_mean_loss_sum(job.model, batch.input_ids,
                                        batch.attention_mask).backward()
    finally:
        pending.clear()
        for handle in handles:
            handle.remove()


def _fold_per_sample_squares(fisher: torch.Tensor, x: torch.Tensor, grad_output: torch.Tensor,
                             kind: str) -> None:
    """fisher += Σ_s G_s², G_s = δ_sᵀ x_s ([out, in], Linear) or x_sᵀ δ_s ([in, out], Conv1D)."""
    n = x.shape[0]
    x = x.to(grad_output.device).reshape(n, -1, x.shape[-1])
    delta = grad_output.reshape(n, -1, grad_output.shape[-1])
    left, right = (delta, x) if kind == "linear" else (x, delta)
    if not left.is_cuda:  # CPU: per-sample matmuls beat a batched one; fold each right away
        for sample in range(n):
            gradient = (left[sample].T @ right[sample]).to(fisher.device)
            fisher.addcmul_(gradient, gradient)
        return
    step = max(1, PER_SAMPLE_CHUNK_ELEMENTS // fisher.numel())
    for start in range(0, n, step):  # GPU: one batched matmul and one fused reduction per chunk
        per_sample = torch.bmm(left[start:start + step].transpose(1, 2), right[start:start + step])
        root_sum_sq = torch.linalg.vector_norm(per_sample, dim=0, dtype=torch.float32)
        root_sum_sq = root_sum_sq.to(fisher.device)
        fisher.addcmul_(root_sum_sq, root_sum_sq)
