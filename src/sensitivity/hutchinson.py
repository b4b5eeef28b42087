"""Hutchinson estimate of diag(H), H = ∂²L/∂w², L = mean next-token NLL over calibration tokens.

For a Rademacher probe z (entries ±1), E[z ⊙ (H z)] = diag(H). Per calibration batch b the
first-order graph is built once (create_graph=True) and reused for all probes of that batch;
each probe costs one Hessian-vector product (a double backward). Batch b's sample is weighted by
its share of tokens n_b / N, so the estimate is exactly the token-mean objective's diagonal in
expectation, also for a short last batch.

A weighted running mean/variance (West's incremental algorithm, a weighted Welford) gives a
per-weight standard error of the estimate.

Probes are a deterministic function of (seed, parameter name, batch index, probe index), so
block mode (``hutchinson_block``: only one transformer block's weights require grad at a time)
draws the same z per weight as whole-model mode; the two differ only through the cross-block
terms z_B ⊙ H_BA z_A, which vanish in expectation.

Memory: the running moments take 8 bytes per weight (float32 mean and M2): 64 GB for an 8B
model, more than the rest of the pass. ``hutchinson_moments`` keeps them on the device or in
(pinned) host memory, where each tensor's moments are fetched for its update and written back as
soon as its sample is ready; auto picks host memory when they would take over a fifth of the GPU.
Samples are folded tensor by tensor as each H z (or g₋) is produced, so no second set of
HVP outputs is held. In block mode on a GPU with device moments only the current block's moments
stay there: each finished block's are merged across torchrun ranks and moved to the CPU (its
scores come back on the CPU). The standard error is computed in M2's memory at the end.

Two Hessian-vector products (``hutchinson_hvp``): ``double_backward`` (autograd's exact H z,
the default in one process) and ``finite_difference`` (central differences of two plain
gradients, src/sensitivity/hvp.py; what runs under --shard). The double backward keeps the
first-order graph of every scored tensor, and fused SDPA / flash attention kernels have none: the
model is switched to the "eager" attention implementation while probing and switched back
afterwards. FSDP2 gathers weights and reduces gradients outside autograd, so --shard refuses it.
Under --shard the finite differences run every batch on every rank (each rank its own rows, the
single-process probes and step sizes) and each rank keeps the moments of its rows.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch

from src.distributed.sharding import local
from src.errors import UserError
from src.models.components import layer_index
from src.options import Settings, choice, integer, number, option
from src.sensitivity.hvp import finite_difference_group, rademacher_like
from src.sensitivity.metrics import METRICS, register
from src.sensitivity.scoring import (MetricOutput, batches, fold_gradients, gradients_only_on,
                                     loss_sum, settings_of)
from src.sensitivity.statistics import median_over_top_k

HVPS = ("auto", "double_backward", "finite_difference")
NOT_SHARDED = ("a Hessian-vector product by double backward does not run under --shard (FSDP2 "
               "gathers weights and reduces gradients outside autograd); use --hutchinson-hvp "
               "finite_difference or auto")


AUTO_ROUND = 4  # probes per batch that --hutchinson-samples auto draws between two checks
# what the flags need: a metric that uses_hutchinson, or --faithfulness (its second-order
# predictions take the Hutchinson diagonal)
SCORED_WITH = "hutchinson_diag, obd or --faithfulness"


def uses_hutchinson(metric: str) -> bool:
    """Whether ``metric`` runs Hutchinson's probes: hutchinson_diag and the metrics derived from
    it (they inherit its settings); an unknown name does not."""
    return metric in METRICS and METRICS[metric].settings is HutchinsonSettings


def _scores_hutchinson(c) -> bool:
    return bool(c.value("faithfulness")) or \
        any(uses_hutchinson(m) for m in (c.metric, *c.value("compare_metrics")))


def _auto(c) -> bool:
    return _scores_hutchinson(c) and c.value("hutchinson_samples") == "auto"


def integer_or_auto(value: str, flag: str) -> int | str:
    return "auto" if value == "auto" else integer(1)(value, flag)


@dataclass(frozen=True)
class HutchinsonSettings(Settings):
    """The flags of the hutchinson_diag metric (registered below) and of the metrics derived
    from it (src/sensitivity/saliency.py)."""
    AFTER = "save_scores"
    hutchinson_samples: int | str = option(8, "Rademacher probes per calibration batch "
                                           "(hutchinson_diag, obd), or auto: rounds of "
                                           f"{AUTO_ROUND} more per batch until the median "
                                           "relative standard error of the top-K estimates is "
                                           "at most --hutchinson-rel-stderr (or "
                                           "--hutchinson-max-samples is reached)",
                                           group="scoring and ranking",
                                           parse=integer_or_auto,
                                           used_when=(SCORED_WITH, _scores_hutchinson))
    hutchinson_rel_stderr: float = option(0.1, "--hutchinson-samples auto stops when the median "
                                          "standard error / |estimate| of the top-K weights is "
                                          "at most this", group="scoring and ranking",
                                          parse=number(0, low_open=True),
                                          used_when=("--hutchinson-samples auto", _auto))
    hutchinson_max_samples: int = option(64, "--hutchinson-samples auto: at most this many "
                                         "probes per calibration batch",
                                         group="scoring and ranking", parse=integer(1),
                                         used_when=("--hutchinson-samples auto", _auto))
    hutchinson_block: bool = option(False, "hutchinson_diag and obd: one transformer block "
                                    "at a time (less memory)", group="scoring and ranking",
                                    used_when=(SCORED_WITH, _scores_hutchinson))
    hutchinson_hvp: str = option("auto", "Hessian-vector product of hutchinson_diag: "
                                 "double_backward (exact, eager attention, keeps the first-order "
                                 "graph), finite_difference (central differences of two plain "
                                 "gradients: fused attention, no graph kept, runs under --shard; its "
                                 "whole-model buffers are larger, so use it with "
                                 "--hutchinson-block at scale), "
                                 "auto (double_backward in one process or torchrun data "
                                 "parallelism, finite_difference under --shard)",
                                 group="scoring and ranking", parse=choice(HVPS),
                                 used_when=(SCORED_WITH, _scores_hutchinson))
    hutchinson_moments: str = option("auto", "where hutchinson_diag's running mean and variance "
                                     "(8 bytes per scored weight) live: device, host (CPU "
                                     "memory, pinned on a GPU; each tensor's moments travel to "
                                     "the GPU for its update and back), auto (host when they "
                                     "would take over a fifth of the GPU's memory, e.g. a "
                                     "whole 8B model; else the device)",
                                     group="scoring and ranking",
                                     parse=choice(("auto", "device", "host")),
                                     used_when=(SCORED_WITH, _scores_hutchinson))

    def problems(self, config):
        if config.shard and self.hutchinson_hvp == "double_backward" and \
                _scores_hutchinson(config):
            yield f"--hutchinson-hvp double_backward: {NOT_SHARDED}"

    def for_job(self, job) -> "HutchinsonSettings":
        """``auto`` HVP decided: finite_difference on sharded weights, else double_backward;
        the stopping rule's settings None with a fixed number of probes (what stored scores
        record: a fixed-probe run's scores do not depend on them)."""
        settings = self
        if self.hutchinson_samples != "auto":
            settings = replace(settings, hutchinson_rel_stderr=None, hutchinson_max_samples=None)
        if self.hutchinson_hvp != "auto":
            return settings
        return replace(settings, hutchinson_hvp="finite_difference" if job.ranks.sharded
                       else "double_backward")

    def rounds(self) -> list[range]:
        """The probe indices drawn per batch, round by round (one round when fixed)."""
        if self.hutchinson_samples != "auto":
            return [range(self.hutchinson_samples)]
        cap = self.hutchinson_max_samples
        return [range(start, min(start + AUTO_ROUND, cap)) for start in range(0, cap, AUTO_ROUND)]


@contextmanager
def double_backward_attention(model):
    """Switch to eager attention (has a double backward); restore the original afterwards."""
    original = getattr(model.config, "_attn_implementation", None)
    switch = original not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(original)


class WeightedWelford:
    """Running weighted mean and variance per element (float32), kept on ``storage``: the
    sample's device, or host memory (``HOST``), in which case each update fetches the tensor's
    moments to the sample's device, updates them there and writes them back, all queued on the
    device's stream (pinned host memory on a GPU: the copies do not block the host)."""

    def __init__(self, shape, device, storage=None):
        storage = torch.device(storage if storage is not None else device)
        pin = storage.type == "cpu" and torch.device(device).type == "cuda" and \
            torch.cuda.is_available()
        self.mean = torch.zeros(shape, dtype=torch.float32, device=storage, pin_memory=pin)
        self.m2 = torch.zeros(shape, dtype=torch.float32, device=storage, pin_memory=pin)
        self.weight_sum = 0.0
        self.weight_sq_sum = 0.0

    def update(self, sample: torch.Tensor, weight: float) -> None:
        self.weight_sum += weight
        self.weight_sq_sum += weight * weight
        if sample.device == self.mean.device:
            self._step(self.mean, self.m2, sample, weight)
            return
        mean = self.mean.to(sample.device, non_blocking=True)
        m2 = self.m2.to(sample.device, non_blocking=True)
        self._step(mean, m2, sample, weight)
        self.mean.copy_(mean, non_blocking=True)
        self.m2.copy_(m2, non_blocking=True)

    def _step(self, mean, m2, sample, weight: float) -> None:
        delta = sample - mean
        mean.add_(delta, alpha=weight / self.weight_sum)
        m2.addcmul_(delta, sample - mean, value=weight)

    def take_standard_error(self) -> torch.Tensor:
        """sqrt(unbiased weighted variance / effective sample size), NaN with one sample,
        computed in M2's memory (no second buffer as large as the model's scores): the moments
        take no further updates."""
        n_eff = self.weight_sum ** 2 / self.weight_sq_sum if self.weight_sq_sum else 0.0
        stderr, self.m2 = self.m2, None
        if n_eff <= 1.0:
            return stderr.fill_(math.nan)
        return stderr.div_(self.weight_sum * (n_eff - 1.0)).sqrt_()


HOST = torch.device("cpu")  # where host-memory moments live (the memory estimate counts it apart)
HOST_SHARE = 0.2  # auto: moments go to host memory above this share of the GPU's memory


def moment_storage(setting: str, group: dict, device: torch.device) -> torch.device:
    """Where ``group``'s running moments live: its weights' device, or host memory (``host``,
    or ``auto`` on a GPU whose memory they would take too much of: ``moments_belong_on_host``)."""
    if setting == "host":
        return HOST
    if setting == "device" or device.type != "cuda":
        return device
    moment_bytes = 8 * sum(local(p).numel() for p in group.values())
    total = torch.cuda.get_device_properties(device).total_memory
    return HOST if moments_belong_on_host(moment_bytes, total) else device


def moments_belong_on_host(moment_bytes: int, device_memory_bytes: int) -> bool:
    """``auto``'s rule: host memory when the moments would take over ``HOST_SHARE`` of the GPU."""
    return moment_bytes > HOST_SHARE * device_memory_bytes


def settle(stats) -> None:
    """Wait for queued moment copies to host memory before the host reads them."""
    if any(s.mean.device.type == "cpu" for s in stats) and torch.cuda.is_available() and \
            torch.cuda.is_initialized():
        torch.cuda.synchronize()


def merge_across_ranks(stats, ranks) -> None:
    """torchrun: turn each rank's running moments into the moments of all ranks' samples, in
    place on every rank (pairwise-merge formula: M2 = Σ_r [M2_r + W_r (mean_r - mean)²]), one
    tensor at a time so the extra memory is one tensor."""
    stats = list(stats)
    totals = ranks.reduced([torch.tensor(x, dtype=torch.float64)
                            for s in stats for x in (s.weight_sum, s.weight_sq_sum)]).tolist()
    for position, s in enumerate(stats):
        local_weight, local_mean = s.weight_sum, s.mean.clone()
        s.weight_sum, s.weight_sq_sum = totals[2 * position], totals[2 * position + 1]
        s.mean.mul_(local_weight)
        ranks.sum_([s.mean])
        if s.weight_sum > 0:
            s.mean.div_(s.weight_sum)
        delta = local_mean.sub_(s.mean)
        s.m2.addcmul_(delta, delta, value=local_weight)
        ranks.sum_([s.m2])


def offload_to_cpu(stats) -> None:
    """Move finished moments off the GPU (block mode: one block's moments on the GPU at a time)."""
    for s in stats:
        if s.mean.is_cuda:
            s.mean, s.m2 = s.mean.cpu(), s.m2.cpu()


def parameter_groups(params: dict, block_mode: bool) -> list[dict]:
    """One group with everything, or one group per transformer block (others together)."""
    if not block_mode:
        return [params]
    groups: dict = {}
    for name, p in params.items():
        groups.setdefault(layer_index(name), {})[name] = p
    return [groups[key] for key in sorted(groups, key=lambda k: (k is None, k or 0))]


def probe_batch(loss, group: dict, stats: dict, *, seed: int, batch_index: int,
                probe_indices: range, weight: float) -> None:
    """Fold the samples z ⊙ (H z) of the probes ``probe_indices`` of one batch's ``loss`` into
    ``stats`` (each with ``weight``), reusing one first-order graph for all of them; each
    tensor's H z is folded and freed as soon as the double backward has produced it."""
    tensors = list(group.values())
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    for probe_index in probe_indices:
        probes = {name: rademacher_like(t, seed, name, batch_index, probe_index)
                  for name, t in group.items()}

        def fold(name, hz):  # z ⊙ Hz is exact in the weight's dtype (z = ±1)
            stats[name].update((probes.pop(name) * hz).float(), weight)

        with fold_gradients(group, fold):
            torch.autograd.backward(grads, grad_tensors=list(probes.values()), inputs=tensors,
                                    retain_graph=probe_index < probe_indices[-1])


def double_backward_group(job, group: dict, stats: dict, probe_indices: range,
                          total_tokens: int) -> None:
    """Fold every batch's probes ``probe_indices`` of ``group`` into ``stats``, H z by double
    backward. A sample's weight is its batch's share of tokens (the estimate and its standard
    error do not change when every weight is scaled, so they need not know the probe count)."""
    for batch in batches(job, "hutchinson"):
        n_tokens = batch.n_predicted_tokens()
        loss = loss_sum(job.model, batch.input_ids, batch.attention_mask) / n_tokens
        probe_batch(loss, group, stats, seed=job.seed, batch_index=batch.index,
                    probe_indices=probe_indices, weight=n_tokens / total_tokens)


def hutchinson_diagonal(job):
    """(signed diagonal estimate, standard error, facts): Scores of the rows held here, and
    how many probes each group took and the precision they reached."""
    model, settings = job.model, settings_of(job, HutchinsonSettings)
    exact = settings.hutchinson_hvp == "double_backward"
    if exact and job.ranks.sharded:
        raise UserError(f"hutchinson_diag: {NOT_SHARDED}")
    if settings.hutchinson_samples == "auto" and job.ranks.distributed and not job.ranks.sharded:
        raise UserError("--hutchinson-samples auto does not run under torchrun data "
                        "parallelism yet (each rank holds part of every weight's samples): "
                        "give a number of probes, or add --shard")
    total_tokens = job.blocks.n_predicted_tokens()
    stats, groups = {}, []
    with double_backward_attention(model) if exact else nullcontext():
        for group in parameter_groups(job.params, settings.hutchinson_block):
            device = local(next(iter(group.values()))).device
            storage = moment_storage(settings.hutchinson_moments, group, device)
            for name, p in group.items():
                stats[name] = WeightedWelford(local(p).shape, local(p).device, storage)
            finished = [stats[name] for name in group]
            with gradients_only_on(model, group):
                groups.append(probe_group(job, settings, group, finished, exact, total_tokens))
            if job.ranks.distributed and not job.ranks.sharded:  # sharded: every batch here
                merge_across_ranks(finished, job.ranks)
            if settings.hutchinson_block:
                offload_to_cpu(finished)
    mean = {name: s.mean for name, s in stats.items()}
    stderr = {name: s.take_standard_error() for name, s in stats.items()}
    return mean, stderr, summary(settings, groups)


def probe_group(job, settings, group: dict, finished: list, exact: bool,
                total_tokens: int) -> dict:
    """Draw ``settings.rounds()`` of probes for every batch into ``group``'s moments, stopping
    early under auto once the target precision is reached; returns the probes drawn per batch
    and the precision reached."""
    stats = dict(zip(group, finished))
    drawn, reached = 0, math.inf
    for probe_indices in settings.rounds():
        if exact:
            double_backward_group(job, group, stats, probe_indices, total_tokens)
        else:
            finite_difference_group(job, group, stats, probe_indices, total_tokens,
                                    batches(job, "hutchinson", own_gradients=True))
        drawn += len(probe_indices)
        settle(finished)
        reached = top_k_relative_error(finished, job.topk, job.ranks)
        if settings.hutchinson_samples == "auto" and reached <= settings.hutchinson_rel_stderr:
            break
    return {"probes_per_batch": drawn, "top_k_median_relative_stderr": reached}


def top_k_relative_error(stats: list, k: int, ranks) -> float:
    """Median of standard error / |estimate| over the ``k`` weights of ``stats`` with the
    largest |estimate| (sharded: over all ranks' rows); inf before two samples."""
    candidates = []  # |estimate| and relative error of each tensor's own top-k
    for s in stats:
        n_eff = s.weight_sum ** 2 / s.weight_sq_sum if s.weight_sq_sum else 0.0
        if n_eff <= 1.0:
            return math.inf
        top = torch.topk(s.mean.flatten().abs(), min(k, s.mean.numel()))
        m2 = s.m2.flatten()[top.indices]
        candidates.append((top.values,
                           (m2 / (s.weight_sum * (n_eff - 1.0))).sqrt_().div_(top.values)))
    return median_over_top_k(candidates, k, ranks)


def summary(settings, groups: list[dict]) -> dict:
    """The facts stored with the scores and shown in the manifest and report."""
    probes = [g["probes_per_batch"] for g in groups]
    errors = [g["top_k_median_relative_stderr"] for g in groups]
    worst = max(errors) if errors else math.inf
    facts = {"probes_per_batch": max(probes) if probes else 0,
             # None: no standard error from a single sample (one probe, one batch)
             "top_k_median_relative_stderr": worst if math.isfinite(worst) else None,
             "samples": settings.hutchinson_samples}
    if settings.hutchinson_samples == "auto":
        facts.update(target=settings.hutchinson_rel_stderr, cap=settings.hutchinson_max_samples,
                     reached=all(e <= settings.hutchinson_rel_stderr for e in errors))
    if len(groups) > 1:
        facts["per_block"] = [{**g, "top_k_median_relative_stderr": (
            g["top_k_median_relative_stderr"] if math.isfinite(g["top_k_median_relative_stderr"])
            else None)} for g in groups]
    return facts


@register("hutchinson_diag", uses_data=True, signed=True,
          description="Hutchinson estimate of the Hessian diagonal (signed)",
          options=("seed", "batch_size", "hutchinson_samples", "hutchinson_block",
                   "hutchinson_hvp", "hutchinson_rel_stderr", "hutchinson_max_samples"),
          shardable=True, settings=HutchinsonSettings, gradients=True)
def hutchinson_diag(job) -> MetricOutput:
    mean, stderr, facts = hutchinson_diagonal(job)
    return MetricOutput(mean, {"stderr": stderr}, facts)
