"""Metrics of the weights and of the mean gradient: magnitude, random, grad_x_weight."""
from __future__ import annotations

import torch

from src.distributed.sharding import held_rows, local
from src.sensitivity.metrics import register
from src.sensitivity.scoring import (MetricOutput, Scores, ScoringJob, batches, fold_gradients,
                                     gradients_only_on, loss_sum, zeros_like_fp32)
from src.utils.seeds import generator_for


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
        scores[name] = held_rows(torch.rand(p.shape, generator=generator, device=device), p)
    return MetricOutput(scores)


@register("grad_x_weight", uses_data=True, description="|mean gradient x weight|",
          shardable=True, gradients=True)
def grad_x_weight(job: ScoringJob) -> MetricOutput:
    mean_grad = mean_gradient(job)
    # in place: the float32 mean gradient becomes the score (no second full-size buffer)
    return MetricOutput({n: mean_grad[n].mul_(local(p).detach()).abs_()
                         for n, p in job.params.items()})


def mean_gradient(job: ScoringJob) -> Scores:
    """ḡ = ∂L/∂w (float32, signed) of the token-mean NLL over all calibration tokens."""
    mean_grad = zeros_like_fp32(job.params)
    total_tokens = job.blocks.n_predicted_tokens()

    def fold(name, grad):
        mean_grad[name].add_(grad)

    with gradients_only_on(job.model, job.params), fold_gradients(job.params, fold):
        for batch in batches(job, "grad_x_weight"):
            loss = loss_sum(job.model, batch.input_ids, batch.attention_mask)
            (loss * (batch.loss_factor / total_tokens)).backward()
    job.ranks.sum_gradients_(mean_grad.values())
    return mean_grad
