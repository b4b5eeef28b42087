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
from src.eval.perplexity import input_device, masked_nll_sum
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
    was_training = job.model.training
    job.model.eval()
    try:
        output = METRICS[metric].fn(job)
    finally:
        job.model.train(was_training)
    for name, score in output.scores.items():
        if not torch.isfinite(score).all():
            raise UserError(f"metric {metric} produced non-finite scores for {name}; the model "
                            f"may be too unstable in this dtype (try --dtype float32)")
    return output


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
    device = input_device(job.model)
    n = math.ceil(len(job.blocks) / job.batch_size)
    return tqdm(job.blocks.batches(job.batch_size, device), total=n, desc=desc,
                disable=not job.progress, leave=False)


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
    return MetricOutput({n: (mean_grad[n] * p.detach().float()).abs_()
                         for n, p in job.params.items()})


@register("grad_squared", uses_data=True, description="empirical Fisher diagonal")
def grad_squared(job: ScoringJob) -> MetricOutput:
    fisher = _zeros_like_fp32(job.params)

    def fold(name, grad):
        grad32 = grad.float()
        fisher[name].addcmul_(grad32, grad32)

    n_sequences = 0
    with gradients_only_on(job.model, job.params), fold_gradients(job.params, fold):
        for input_ids, attention_mask in _batches(job, "grad_squared"):
            for row in range(input_ids.shape[0]):  # one backward per sequence: per-sequence grads
                ids, mask = input_ids[row:row + 1], attention_mask[row:row + 1]
                n_tokens = (mask[:, 1:] * mask[:, :-1]).sum()
                (_loss_sum(job.model, ids, mask) / n_tokens.clamp(min=1)).backward()
                n_sequences += 1
    return MetricOutput({n: f.div_(max(n_sequences, 1)) for n, f in fisher.items()})


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
    try:
        with torch.inference_mode():
            for input_ids, attention_mask in _batches(job, "act_mag"):
                current_mask["mask"] = attention_mask
                job.model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for name, p in job.params.items():
        norm = sumsq[name].sqrt()
        kind = owners[name][1]
        shape = {"linear": (1, -1), "conv1d": (-1, 1), "embedding": (-1, 1)}[kind]
        scores[name] = p.detach().float().abs() * norm.view(shape)
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


def _input_norm_hook(sumsq: torch.Tensor, kind: str, current_mask: dict):
    def hook(module, inputs, output):
        x = inputs[0]
        mask = current_mask.get("mask")
        if kind == "embedding":
            index = x[mask.bool()] if mask is not None and mask.shape == x.shape else x.reshape(-1)
            sumsq.add_(torch.bincount(index.reshape(-1), minlength=sumsq.numel()).float())
            return
        x = x.float()
        if mask is not None and mask.shape == x.shape[:-1]:
            x = x * mask.to(x.device, x.dtype).unsqueeze(-1)
        sumsq.add_(x.reshape(-1, x.shape[-1]).square().sum(dim=0))
    return hook


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
