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
"""
from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from src.data.loading import TokenBlocks
from src.errors import UserError
from src.eval.perplexity import input_device, masked_nll_sum, token_nll
from src.models.components import component_of, layer_index

Scores = dict[str, torch.Tensor]


@dataclass
class ScoringJob:
    """What a metric needs: the model, the weights to score and the calibration blocks."""
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    blocks: TokenBlocks
    batch_size: int = 4
    seed: int = 0
    hutchinson_samples: int = 8
    hutchinson_block: bool = False
    progress: bool = False
    data_parallel: object = None  # src.utils.distributed.DataParallel under torchrun, else None


@dataclass
class MetricOutput:
    scores: Scores
    extra: dict[str, Scores] = field(default_factory=dict)  # e.g. {"stderr": ...}


@dataclass(frozen=True)
class Metric:
    fn: Callable[[ScoringJob], MetricOutput]
    uses_data: bool
    signed: bool
    description: str


METRICS: dict[str, Metric] = {}


def register(name: str, *, uses_data: bool, signed: bool = False, description: str = ""):
    def wrap(fn):
        METRICS[name] = Metric(fn, uses_data, signed, description)
        return fn
    return wrap


def compute_scores(job: ScoringJob, metric: str) -> MetricOutput:
    if metric not in METRICS:
        raise UserError(f"unknown --metric '{metric}'; choose one of {', '.join(METRICS)}")
    if job.data_parallel is not None and METRICS[metric].uses_data:
        job.data_parallel.announce(job, metric)  # rank 0: the other ranks score the same job
    was_training = job.model.training
    job.model.eval()
    try:
        output = METRICS[metric].fn(job)
    finally:
        job.model.train(was_training)
    for name in _non_finite(output.scores):
        raise UserError(f"metric {metric} produced non-finite scores for {name}; the model "
                        f"may be too unstable in this dtype (try --dtype float32)")
    return output


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


# ----------------------------------------------------------------------------- eligibility

def parse_layers(spec: str | None) -> set[int] | None:
    """'0-3,10' -> {0, 1, 2, 3, 10}; None -> None (all layers)."""
    if not spec:
        return None
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                low, high = (int(x) for x in part.split("-"))
                if high < low:
                    raise ValueError
                layers.update(range(low, high + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise UserError(f"bad --layers '{spec}': use indices and ranges like 0-3,10") from None
    return layers


def eligible_parameters(model, include_embeddings: bool = False, layers: set[int] | None = None,
                        components: set[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """Scored weights: every matrix (ndim >= 2) except embeddings and output head by default.

    Tied weights (GPT-2 ``wte`` = ``lm_head``) appear once, under their first name.
    """
    selected = {}
    for name, param in model.named_parameters():  # de-duplicates tied weights
        if param.ndim < 2:
            continue
        component = component_of(name)
        if component in ("embedding", "pos_embedding", "head") and not include_embeddings:
            continue
        if layers is not None and layer_index(name) not in layers:
            continue
        if components is not None and component not in components:
            continue
        selected[name] = param
    if not selected:
        raise UserError("no weights are eligible for scoring with these --layers/--include-"
                        "embeddings/--target-components settings")
    return selected


def tied_parameter_names(model) -> dict[str, str]:
    """alias name -> kept name, for parameters shared between modules (e.g. lm_head = wte)."""
    kept_by_id, aliases = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in kept_by_id:
            aliases[name] = kept_by_id[id(param)]
        else:
            kept_by_id[id(param)] = name
    return aliases


# ----------------------------------------------------------------------------- shared machinery

@contextmanager
def gradients_only_on(model, params: dict[str, torch.nn.Parameter]):
    """requires_grad on exactly ``params`` for the duration; restores flags, drops grads."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
            p.grad = None


@contextmanager
def fold_gradients(params: dict[str, torch.nn.Parameter], fold: Callable):
    """Call ``fold(name, grad)`` as soon as each gradient is ready, then free it.

    Scores accumulate on the weight's device in float32 without a host sync, and no gradient
    outlives its backward pass.
    """
    handles = []
    for name, param in params.items():
        def hook(p, name=name):
            fold(name, p.grad)
            p.grad = None
        handles.append(param.register_post_accumulate_grad_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zeros_like_fp32(params) -> Scores:
    return {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for name, p in params.items()}


def _batches(job: ScoringJob, desc: str):
    """(input_ids, attention_mask) of this process's calibration batches, on the input device."""
    for _, input_ids, attention_mask in _indexed_batches(job, desc):
        yield input_ids, attention_mask


def _indexed_batches(job: ScoringJob, desc: str):
    """(global batch index, input_ids, attention_mask): every batch in one process; under
    torchrun only this rank's batches, with the indices they have in the single-process run."""
    n_batches = math.ceil(len(job.blocks) / job.batch_size)
    mine = range(n_batches) if job.data_parallel is None else \
        job.data_parallel.my_batches(n_batches)
    blocks = job.blocks
    if len(mine) < n_batches:
        rows = [r for b in mine for r in range(b * job.batch_size,
                                               min((b + 1) * job.batch_size, len(blocks)))]
        blocks = blocks.subset(rows)
    batches = zip(mine, blocks.batches(job.batch_size, input_device(job.model)))
    for index, (input_ids, attention_mask) in tqdm(batches, total=len(mine), desc=desc,
                                                   disable=not job.progress, leave=False):
        yield index, input_ids, attention_mask


def all_reduce_sum_(job: ScoringJob, tensors) -> None:
    """Under torchrun: sum each accumulator over ranks, in place (no-op in one process)."""
    if job.data_parallel is not None:
        job.data_parallel.all_reduce_sum_(list(tensors))


def _loss_sum(model, input_ids, attention_mask) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return masked_nll_sum(logits, input_ids, attention_mask)


# ----------------------------------------------------------------------------- metrics

@register("magnitude", uses_data=False, description="|w|")
def magnitude(job: ScoringJob) -> MetricOutput:
    return MetricOutput({n: p.detach().float().abs() for n, p in job.params.items()})


@register("random", uses_data=False, description="seeded uniform [0,1) null metric")
def random_scores(job: ScoringJob) -> MetricOutput:
    scores = {}
    for name, p in job.params.items():
        generator = torch.Generator(device=p.device).manual_seed(_stable_seed(job.seed, name))
        scores[name] = torch.rand(p.shape, generator=generator, device=p.device)
    return MetricOutput(scores)


@register("grad_x_weight", uses_data=True, description="|mean gradient x weight|")
def grad_x_weight(job: ScoringJob) -> MetricOutput:
    mean_grad = _zeros_like_fp32(job.params)
    total_tokens = job.blocks.n_predicted_tokens()

    def fold(name, grad):
        mean_grad[name].add_(grad)

    with gradients_only_on(job.model, job.params), fold_gradients(job.params, fold):
        for input_ids, attention_mask in _batches(job, "grad_x_weight"):
            (_loss_sum(job.model, input_ids, attention_mask) / total_tokens).backward()
    all_reduce_sum_(job, mean_grad.values())
    # in place: the float32 mean gradient becomes the score (no second full-size buffer)
    return MetricOutput({n: mean_grad[n].mul_(p.detach()).abs_() for n, p in job.params.items()})


@register("grad_squared", uses_data=True, description="empirical Fisher diagonal")
def grad_squared(job: ScoringJob) -> MetricOutput:
    """Mean over sequences s of (∂L_s/∂w)², L_s = token-mean NLL of sequence s.

    Fast path (every scored weight belongs to one Linear / Conv1D layer called once per forward):
    one backward per batch of Σ_s L_s; each layer's per-sequence gradients δ_sᵀ x_s come from its
    saved input x and output gradient δ (a batched matmul, the work autograd would do for the
    summed gradient), and their squares are summed in float32 right away. Otherwise one backward
    per sequence."""
    fisher = _zeros_like_fp32(job.params)
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
    all_reduce_sum_(job, fisher.values())
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

    with gradients_only_on(job.model, job.params), fold_gradients(job.params, fold):
        for input_ids, attention_mask in _batches(job, "grad_squared"):
            for row in range(input_ids.shape[0]):  # one backward per sequence
                _sequence_mean_loss_sum(job.model, input_ids[row:row + 1],
                                        attention_mask[row:row + 1]).backward()


def _single_use_linear_owners(model, params) -> dict | None:
    """name -> (module, kind) when each scored weight is the weight of exactly one Linear or
    Conv1D layer (no tied or foreign uses), else None."""
    owners, counts = {}, {}
    wanted = {id(p): name for name, p in params.items()}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) not in wanted:
            continue
        name = wanted[id(weight)]
        counts[name] = counts.get(name, 0) + 1
        kind = "conv1d" if type(module).__name__ == "Conv1D" else \
            "linear" if isinstance(module, torch.nn.Linear) else None
        owners[name] = (module, kind)
    if set(owners) != set(params) or any(c != 1 for c in counts.values()) or \
            any(kind is None for _, kind in owners.values()):
        return None
    return owners


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
            _fold_per_sample_squares(fisher[name], x, grad_output, kind)
        output.register_hook(on_grad)

    names = {module: (name, kind) for name, (module, kind) in owners.items()}
    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    try:
        with gradients_only_on(job.model, {}):
            for input_ids, attention_mask in _batches(job, "grad_squared"):
                pending.clear()
                batch_rows["n"] = input_ids.shape[0]
                _sequence_mean_loss_sum(job.model, input_ids, attention_mask).backward()
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


@register("act_mag", uses_data=True, description="|W| x input-channel L2 norm (Wanda)")
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
        with torch.inference_mode():
            for input_ids, attention_mask in _batches(job, "act_mag"):
                current_mask.clear()
                current_mask["mask"] = attention_mask if padded else None
                job.model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    all_reduce_sum_(job, sumsq.values())
    scores = {}
    for name, p in job.params.items():
        norm = sumsq[name].sqrt()
        kind = owners[name][1]
        shape = {"linear": (1, -1), "conv1d": (-1, 1), "embedding": (-1, 1)}[kind]
        scores[name] = p.detach().abs().float().mul_(norm.view(shape))
    return MetricOutput(scores)


def _owner_modules(model, params) -> dict[str, tuple[torch.nn.Module, str]]:
    wanted = {id(p): name for name, p in params.items()}
    owners = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) not in wanted or wanted[id(weight)] in owners:
            continue
        kind = {"Linear": "linear", "Conv1D": "conv1d", "Embedding": "embedding"}.get(
            type(module).__name__)
        if kind is None and isinstance(module, torch.nn.Linear):
            kind = "linear"
        if kind is None:
            raise UserError(f"act_mag does not support {type(module).__name__} weights "
                            f"({wanted[id(weight)]}); use another --metric")
        owners[wanted[id(weight)]] = (module, kind)
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
          description="Hutchinson estimate of the Hessian diagonal (signed)")
def hutchinson_diag(job: ScoringJob) -> MetricOutput:
    from src.sensitivity.hutchinson import hutchinson_diagonal
    mean, stderr = hutchinson_diagonal(job)
    return MetricOutput(mean, {"stderr": stderr})


def _stable_seed(seed: int, *parts) -> int:
    """A seed that depends only on (seed, parts), stable across processes and runs."""
    text = "|".join(str(p) for p in (seed, *parts))
    return zlib.crc32(text.encode()) + (seed % 1000) * (1 << 32)
