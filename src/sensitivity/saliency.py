"""Saliencies ½·d_i·w_i² (Optimal Brain Damage, LeCun et al. 1990): the second-order loss change
of setting weight i to zero when d_i is the curvature along it and the gradient is neglected.
Both are derived metrics (src/sensitivity/metrics.py): they transform their base's output
without running a pass of their own, so scoring one together with its base costs one pass.

* ``obd``        ½·H_ii·w_i², H_ii hutchinson_diag's estimate (nats: the loss is the token-mean
                 NLL, H_ii in nats per weight unit²). Signed like H_ii; ranking uses |score|. Its
                 standard error is ½·w_i²·stderr(H_ii): the relative error per weight is
                 hutchinson_diag's, only which weights are the top-K differs, so the facts
                 state the median relative standard error over obd's own top-K.
* ``fisher_w2``  ½·F_ii·w_i², F_ii grad_squared's empirical Fisher diagonal (mean over sequences of
                 the squared gradient of each sequence's token-mean NLL; nats²). Non-negative.

w is the weight in float32, of the rows this process holds (the base's scores are those rows).
"""
from __future__ import annotations

import math

import torch

from src.distributed.sharding import local
from src.sensitivity.metrics import register
from src.sensitivity.scoring import MetricOutput, Scores, ScoringJob
from src.sensitivity.statistics import top_k_relative_stderr


def half_squared_weight(param: torch.nn.Parameter, device: torch.device) -> torch.Tensor:
    """½·w² (float32, a new tensor on ``device``) of the rows of ``param`` held here."""
    weight = local(param).detach().to(device=device, dtype=torch.float32)
    return weight.square().mul_(0.5)


def times_half_squared_weight(job: ScoringJob, per_weight: Scores) -> Scores:
    """½·w²·x for every tensor x of ``per_weight`` (new tensors; ``per_weight`` is unchanged)."""
    return {name: half_squared_weight(job.params[name], x.device).mul_(x)
            for name, x in per_weight.items()}


@register("obd", base="hutchinson_diag", signed=True,
          description="Optimal Brain Damage saliency ½·H_ii·w² (signed, with standard error)")
def obd(job: ScoringJob, hessian: MetricOutput) -> MetricOutput:
    scores = times_half_squared_weight(job, hessian.scores)
    stderr = times_half_squared_weight(job, hessian.extra["stderr"])
    return MetricOutput(scores, {"stderr": stderr}, obd_facts(job, hessian.facts, scores, stderr))


def obd_facts(job: ScoringJob, hessian_facts: dict, scores: Scores, stderr: Scores) -> dict:
    """hutchinson_diag's facts (probes drawn, settings), with the median relative standard
    error over obd's own top-K (None when not defined) and, under --hutchinson-samples auto,
    that the stopping rule ranked by hutchinson_diag's top-K."""
    error = top_k_relative_stderr(scores, stderr, job.topk, job.ranks)
    facts = {**hessian_facts, "top_k_median_relative_stderr": error if math.isfinite(error)
             else None}
    if hessian_facts.get("samples") == "auto":
        facts["stopping_rule_top_k"] = "hutchinson_diag"
    return facts


@register("fisher_w2", base="grad_squared", description="½ · empirical Fisher diagonal · w²")
def fisher_w2(job: ScoringJob, fisher: MetricOutput) -> MetricOutput:
    return MetricOutput(times_half_squared_weight(job, fisher.scores))
