"""What every metric shares: the scoring job, gradient hooks, batch iteration and seeds.

The loss L is the mean next-token NLL (nats) over all valid calibration tokens (src/eval). A
metric differentiates per batch the batch's NLL sum divided by the token count of *all*
calibration blocks, so the accumulated gradient is exactly ∂L/∂w whatever the batch sizes.
Scores accumulate on the weight's device in float32; nothing is synchronised per batch.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from src.data.loading import TokenBlocks
from src.eval.perplexity import masked_nll_sum
from src.models.properties import input_device
from src.distributed.sharding import local
from src.utils import progress

Scores = dict[str, torch.Tensor]


@dataclass
class ScoringJob:
    """What a metric needs: the model, the weights to score and the calibration blocks."""
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    blocks: TokenBlocks
    batch_size: int = 4
    seed: int = 0
    settings: dict = field(default_factory=dict)  # the metrics' settings, by settings class
    progress: str = "off"  # src.utils.progress mode: bars, lines or off
    data_parallel: object = None  # src.sensitivity.data_parallel.DataParallel under torchrun
    shards: object = None  # src.distributed.sharding.ShardGroup under torchrun --shard


@dataclass
class MetricOutput:
    scores: Scores
    extra: dict[str, Scores] = field(default_factory=dict)  # e.g. {"stderr": ...}


def settings_of(job: ScoringJob, settings_class):
    """A metric's settings in ``job`` (``settings_class``'s defaults when it was given none)."""
    return job.settings[settings_class] if settings_class in job.settings else settings_class()


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
    """Call ``fold(name, grad)`` as soon as each gradient is ready, then free it: no gradient
    outlives its backward pass."""
    handles = []
    for name, param in params.items():
        def hook(p, name=name):
            fold(name, local(p.grad))
            p.grad = None
        handles.append(param.register_post_accumulate_grad_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def zeros_like_fp32(params) -> Scores:
    """float32 zeros shaped like the part of each parameter this process holds."""
    return {name: torch.zeros(local(p).shape, dtype=torch.float32, device=local(p).device)
            for name, p in params.items()}


def batches(job: ScoringJob, desc: str, split: bool = True):
    """(input_ids, attention_mask) of this process's calibration batches, on the input device.
    ``split=False``: under --shard every rank takes every batch."""
    for _, input_ids, attention_mask in indexed_batches(job, desc, split):
        yield input_ids, attention_mask


def indexed_batches(job: ScoringJob, desc: str, split: bool = True):
    """(global batch index, input_ids, attention_mask): every batch in one process; under
    torchrun only this rank's batches, with the indices they have in the single-process run.
    Under --shard a rank short of batches gets padding steps: index None, batch 0's tokens,
    whose contribution the metric discards (FSDP needs equal passes on every rank)."""
    n_batches = math.ceil(len(job.blocks) / job.batch_size)
    if job.shards is not None and not split:
        mine = range(n_batches)
    elif job.shards is not None:
        mine = job.shards.my_batches(n_batches)
    elif job.data_parallel is not None:
        mine = job.data_parallel.my_batches(n_batches)
    else:
        mine = range(n_batches)
    device = input_device(job.model)
    start = time.perf_counter()
    for index in tqdm(mine, desc=desc, disable=job.progress != "bars", leave=False):
        yield (index, *job.blocks.batch(0 if index is None else index, job.batch_size, device))
    if job.progress == "lines":
        progress.line(f"{desc}: scoring pass over {len(mine)} batches of {job.batch_size} "
                      f"blocks done in {time.perf_counter() - start:.1f} s")


def gradient_scale(job: ScoringJob, index) -> float:
    """Loss multiplier: 0 for a padding step; under --shard N, because FSDP's reduce-scatter
    averages the ranks' gradients (the sum is wanted); else 1."""
    if index is None:
        return 0.0
    return float(job.shards.world_size) if job.shards is not None else 1.0


def all_reduce_sum_(job: ScoringJob, tensors, gradients: bool = True) -> None:
    """Sum accumulators over processes, in place: under torchrun data parallelism every one;
    under --shard only sums of activations (FSDP's backward has already reduced gradients).
    No-op in one process."""
    if job.data_parallel is not None:
        job.data_parallel.all_reduce_sum_(list(tensors))
    elif job.shards is not None and not gradients:
        job.shards.all_reduce_sum_(list(tensors))


def loss_sum(model, input_ids, attention_mask) -> torch.Tensor:
    """Next-token NLL summed over the batch's valid positions (nats)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return masked_nll_sum(logits, input_ids, attention_mask)
