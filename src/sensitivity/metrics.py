"""Sensitivity metrics: a registry of name -> scoring function, and compute_scores().

Every metric returns ``Scores``: parameter name -> float32 tensor of that parameter's shape, on
the parameter's device. The loss L is the mean next-token NLL (nats) over all valid calibration
tokens; scoring runs in eval mode (no dropout) with gradients only on the scored weights.

* ``grad_x_weight``  |ḡ ⊙ w|, ḡ = ∂L/∂w over all calibration tokens (first-order Taylor).
* ``grad_squared``   empirical Fisher diagonal: mean over sequences s of (∂L_s/∂w)², L_s the
                     token-mean NLL of sequence s.
* ``hutchinson_diag`` diag(∂²L/∂w²) ≈ mean over Rademacher probes z and batches of z ⊙ (H z).
                     Signed; ranking uses |score|. A standard error per weight comes with it.
* ``magnitude``      |w|.
* ``act_mag``        |W_ij| · ‖X_j‖₂ (Wanda): X_j = input channel j of the weight's layer over all
                     real calibration tokens. For an embedding, ‖X_j‖₂ = sqrt(count of index j).
* ``random``         seeded uniform [0, 1): a null metric.

A metric's own flags: a ``Settings`` dataclass (src/options.py) named in ``register(...,
settings=)``, read with ``settings_of(job, ItsSettings)``; ``options`` (job or settings fields
that change the scores) are recorded with stored scores (README: adding a metric).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from src.errors import UserError
from src.eval.perplexity import token_nll
from src.sensitivity.hutchinson import HutchinsonSettings, hutchinson_diagonal
from src.sensitivity.scoring import (MetricOutput, Scores, ScoringJob, batches, fold_gradients,
                                     gradients_only_on, loss_sum, settings_of, zeros_like_fp32)
from src.utils.seeds import generator_for
from src.distributed.sharding import local, local_rows, without_grad


@dataclass(frozen=True)
class Metric:
    fn: Callable[[ScoringJob], MetricOutput]
    uses_data: bool
    signed: bool
    description: str
    options: tuple[str, ...] = ()  # job or settings fields that change the scores
    shardable: bool = False  # runs on FSDP-sharded weights (torchrun --shard)
    unshardable_because: str = ""  # why not, when it is a limit of FSDP and not of this tool
    settings: type | None = None  # its flags: a src.options.Settings dataclass


METRICS: dict[str, Metric] = {}


def register(name: str, *, uses_data: bool, signed: bool = False, description: str = "",
             options: tuple[str, ...] = (), shardable: bool = False,
             unshardable_because: str = "", settings: type | None = None):
    def wrap(fn):
        METRICS[name] = Metric(fn, uses_data, signed, description, options, shardable,
                               unshardable_because, settings)
        return fn
    return wrap


def option_value(metric: str, job: ScoringJob, key: str):
    """One of ``metric``'s options in ``job``: a field of the metric's settings, else the job's."""
    settings_class = METRICS[metric].settings
    if settings_class is not None and key in settings_class.__dataclass_fields__:
        return getattr(settings_of(job, settings_class), key)
    return getattr(job, key)


def compute_scores(job: ScoringJob, metric: str) -> MetricOutput:
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if job.ranks.sharded and not METRICS[metric].shardable:
        raise UserError(f"metric {metric} does not run on sharded weights (--shard); use one of "
                        f"{', '.join(shardable_metrics())}")
    was_training = job.model.training
    job.model.eval()
    try:
        output = METRICS[metric].fn(job)
    finally:
        job.model.train(was_training)
    for name in _non_finite(output.scores):
        raise UserError(f"metric {metric} produced non-finite scores for {name}; the model "
                        f"may be too unstable in this dtype (try float32)")
    return output


def shardable_metrics() -> list[str]:
    return [name for name, metric in METRICS.items() if metric.shardable]


def _non_finite(scores: Scores) -> list[str]:
    """Names of score tensors holding inf or NaN. A NaN or inf entry makes the tensor's sum
    non-finite, so one summing pass per tensor (read on the host together) clears the normal
    case; only a non-finite sum (which a finite overflow can also give) gets the exact test."""
    totals = [score.sum(dtype=torch.float32) for score in scores.values()]
    for device in {total.device for total in totals if total.is_cuda}:
        torch.cuda.synchronize(device)
    totals = [total.cpu() for total in totals]
    return [name for (name, score), total in zip(scores.items(), totals)
            if not torch.isfinite(total) and not bool(torch.isfinite(score).all())]


# ----------------------------------------------------------------------------- metrics

@register("magnitude", uses_data=False, description="|w|", shardable=True)
def magnitude(job: ScoringJob) -> MetricOutput:
    return MetricOutput({n: local(p).detach().float().abs() for n, p in job.params.items()})


@register("random", uses_data=False, description="seeded uniform [0,1) null metric",
          options=("seed",), shardable=True)
def random_scores(job: ScoringJob) -> MetricOutput:
    """Drawn for the whole tensor (one at a time) and cut to the rows held here, so a sharded
    run draws the same numbers as one process."""
    scores = {}
    for name, p in job.params.items():
        device = local(p).device
        generator = generator_for(device, job.seed, name)
        drawn = torch.rand(p.shape, generator=generator, device=device)
        rows = local_rows(p)
        scores[name] = drawn if len(rows) == p.shape[0] else drawn[rows.start:rows.stop].clone()
    return MetricOutput(scores)


@register("grad_x_weight", uses_data=True, description="|mean gradient x weight|",
          shardable=True)
def grad_x_weight(job: ScoringJob) -> MetricOutput:
    mean_grad = zeros_like_fp32(job.params)
    total_tokens = job.blocks.n_predicted_tokens()

    def fold(name, grad):
        mean_grad[name].add_(grad)

    with gradients_only_on(job.model, job.params), fold_gradients(job.params, fold):
        for batch in batches(job, "grad_x_weight"):
            loss = loss_sum(job.model, batch.input_ids, batch.attention_mask)
            (loss * (batch.loss_factor / total_tokens)).backward()
    job.ranks.sum_gradients_(mean_grad.values())
    # in place: the float32 mean gradient becomes the score (no second full-size buffer)
    return MetricOutput({n: mean_grad[n].mul_(local(p).detach()).abs_()
                         for n, p in job.params.items()})


@register("grad_squared", uses_data=True, description="empirical Fisher diagonal",
          shardable=True)
def grad_squared(job: ScoringJob) -> MetricOutput:
    """Mean over sequences s of (∂L_s/∂w)², L_s = token-mean NLL of sequence s.

    Fast path (every scored weight belongs to one Linear / Conv1D layer called once per forward):
    one backward per batch of Σ_s L_s; each layer's per-sequence gradients δ_sᵀ x_s come from its
    saved input x and output gradient δ (a batched matmul, the work autograd would do for the
    summed gradient), and their squares are summed in float32 right away. Otherwise one backward
    per sequence.

    Under --shard every rank runs every batch (a square of a sum over ranks is not a sum of
    squares) and computes the per-sequence gradients of its own rows only."""
    fisher = zeros_like_fp32(job.params)
    owners = _single_use_linear_owners(job.model, job.params)
    done = False
    if owners is not None:
        try:
            _per_sample_squared_grads(job, owners, fisher)
            done = True
        except _NotPerSample:  # e.g. a layer applied twice per forward: per-sequence backward
            for f in fisher.values():
                f.zero_()
    if not done:
        _per_sequence_squared_grads(job, fisher)
    job.ranks.sum_gradients_(fisher.values())  # sharded: each rank has its rows' whole sums
    n_sequences = max(len(job.blocks), 1)
    return MetricOutput({n: f.div_(n_sequences) for n, f in fisher.items()})


class _NotPerSample(Exception):
    """The model's layers do not map one input row to one sequence: use the per-sequence path."""


PER_SAMPLE_CHUNK_ELEMENTS = 1 << 28  # per-sequence gradients materialised at once (elements)


def _sequence_mean_loss_sum(model, input_ids, attention_mask) -> torch.Tensor:
    """Σ_s L_s over the batch, L_s = token-mean NLL of sequence s (0 for a sequence w/o tokens)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    nll, valid = token_nll(logits, input_ids, attention_mask)
    per_sequence = (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    return per_sequence.sum()


def _per_sequence_squared_grads(job: ScoringJob, fisher: Scores) -> None:
    def fold(name, grad):  # fp32 square of the stored-dtype gradient, no float copy
        fisher[name].addcmul_(grad, grad)

    # sharded: every rank runs the same sequences, so FSDP's mean over ranks is the gradient
    with gradients_only_on(job.model, job.params), fold_gradients(job.params, fold):
        for batch in batches(job, "grad_squared", squares=True):
            for row in range(batch.input_ids.shape[0]):  # one backward per sequence
                _sequence_mean_loss_sum(job.model, batch.input_ids[row:row + 1],
                                        batch.attention_mask[row:row + 1]).backward()


def _single_use_linear_owners(model, params) -> dict | None:
    """name -> (module, kind) when each scored weight is the weight of exactly one Linear or
    Conv1D layer (no tied or foreign uses), else None."""
    owners = _owner_layers(model, params)
    if set(owners) != set(params) or any(len(found) != 1 or found[0][1] not in ("linear", "conv1d")
                                         for found in owners.values()):
        return None
    return {name: found[0] for name, found in owners.items()}


def _owner_layers(model, params) -> dict[str, list[tuple[torch.nn.Module, str | None]]]:
    """name -> every (layer, kind) holding that scored weight as its ``weight``, in model order;
    kind is linear, conv1d, embedding, or None for a layer type no metric knows."""
    wanted = {id(p): name for name, p in params.items()}
    owners: dict[str, list] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) not in wanted:
            continue
        kind = LAYER_KINDS.get(type(module).__name__)
        if kind is None and isinstance(module, torch.nn.Linear):
            kind = "linear"
        owners.setdefault(wanted[id(weight)], []).append((module, kind))
    return owners


LAYER_KINDS = {"Linear": "linear", "Conv1D": "conv1d", "Embedding": "embedding"}


def _per_sample_squared_grads(job: ScoringJob, owners: dict, fisher: Scores) -> None:
    """Fold Σ_s (∂L_s/∂W)² of every owner layer into ``fisher``, one backward per batch.

    The weights themselves do not require grad (no summed weight gradient is computed); the
    first scored layer's input is made to require grad so that the backward reaches every layer.
    """
    pending: dict = {}
    batch_rows = {}

    def before(module, args):
        x = args[0]
        if x.shape[0] != batch_rows["n"]:
            raise _NotPerSample
        if not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def after(module, args, output):
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
        output.register_hook(on_grad)

    names = {module: (name, kind) for name, (module, kind) in owners.items()}
    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    try:
        with gradients_only_on(job.model, {}):
            for batch in batches(job, "grad_squared", squares=True):
                pending.clear()
                batch_rows["n"] = batch.input_ids.shape[0]
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
                job.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    job.ranks.sum_(sumsq.values())
    scores = {}
    for name, p in job.params.items():
        norm = sumsq[name].sqrt()
        if owners[name][1] == "linear":  # input channels are columns: every rank has them all
            norm = norm.view(1, -1)
        else:  # Conv1D, embedding: input channels are rows, cut like the weight
            rows = local_rows(p)
            norm = norm[rows.start:rows.stop].view(-1, 1)
        scores[name] = local(p).detach().abs().float().mul_(norm)
    return MetricOutput(scores)


def _owner_modules(model, params) -> dict[str, tuple[torch.nn.Module, str]]:
    """name -> the first layer holding the weight, whose input act_mag measures."""
    owners = {}
    for name, found in _owner_layers(model, params).items():
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
            state["input"], state["column_sumsq"] = x, _column_sumsq(x, mask)
        sumsq.add_(state["column_sumsq"].to(sumsq.device))
    return hook


def _column_sumsq(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
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


@register("hutchinson_diag", uses_data=True, signed=True,
          description="Hutchinson estimate of the Hessian diagonal (signed)",
          options=("seed", "batch_size", "hutchinson_samples", "hutchinson_block"),
          unshardable_because="a Hessian-vector product is a double backward, and FSDP2 "
                              "gathers weights and reduces gradients outside autograd",
          settings=HutchinsonSettings)
def hutchinson_diag(job: ScoringJob) -> MetricOutput:
    mean, stderr = hutchinson_diagonal(job)
    return MetricOutput(mean, {"stderr": stderr})
