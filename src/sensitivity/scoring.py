"""What every metric shares: the scoring job, gradient hooks, batch iteration and seeds.

The loss L is the mean next-token NLL (nats) over all valid calibration tokens (src/eval). A
metric differentiates per batch the batch's NLL sum divided by the token count of *all*
calibration blocks, so the accumulated gradient is exactly ∂L/∂w whatever the batch sizes.
Scores accumulate on the weight's device in float32; nothing is synchronised per batch.
"""
from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from src.data.loading import TokenBlocks
from src.eval.perplexity import masked_nll_sum
from src.models.properties import input_device
from src.distributed.ranks import Ranks
from src.distributed.sharding import decoder_blocks, local
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
    ranks: Ranks = field(default_factory=Ranks)  # the processes the batches are split over
    topk: int = 100  # the run's K: a metric that stops on its top weights' precision uses it
    gradient_checkpointing: bool = False  # recompute block activations in backward passes


@dataclass
class MetricOutput:
    scores: Scores
    extra: dict[str, Scores] = field(default_factory=dict)  # e.g. {"stderr": ...}
    facts: dict = field(default_factory=dict)  # how they were computed (JSON), e.g. probes used


def settings_of(job: ScoringJob, settings_class):
    """A metric's settings as ``job`` runs them (``settings_class``'s defaults when it was given
    none; ``for_job`` decides any "auto")."""
    given = job.settings[settings_class] if settings_class in job.settings else settings_class()
    return given.for_job(job)


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


class _Recomputation:
    """Entered while a checkpointed block runs again (re-entrant: a double backward recomputes
    a block once per backward through it)."""
    depth = 0

    def __enter__(self):
        _Recomputation.depth += 1

    def __exit__(self, *exc):
        _Recomputation.depth -= 1


def recomputing() -> bool:
    """True while a checkpointed block runs its forward again inside a backward pass: a forward
    hook that records something per forward must skip that second run."""
    return _Recomputation.depth > 0


@contextmanager
def recomputed_blocks(model):
    """Gradient checkpointing for the duration (torch.utils.checkpoint, non-reentrant): each
    decoder block keeps only its inputs in the forward and runs again in the backward, so the
    activations of one block are alive instead of all of them, for about one more forward."""
    from torch.utils.checkpoint import checkpoint

    def contexts():  # the first run as usual, the second inside recomputing()
        return nullcontext(), _Recomputation()

    patched = []
    for block in decoder_blocks(model):
        own = block.__dict__.get("forward")  # e.g. a hook library's wrapper, restored as found
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False,
                                          context_fn=contexts)
        patched.append((block, own))
    try:
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own


def zeros_like_fp32(params) -> Scores:
    """float32 zeros shaped like the part of each parameter this process holds."""
    return {name: torch.zeros(local(p).shape, dtype=torch.float32, device=local(p).device)
            for name, p in params.items()}


@dataclass
class Batch:
    """One calibration batch of this process, on the model's input device."""
    index: int  # its index among the single-process batches (keys per-batch draws)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_factor: float  # multiply the batch's loss by this before a backward
    counted: bool  # False: a pass made only to keep sharded ranks in step; sums skip it

    def n_predicted_tokens(self) -> int:
        return TokenBlocks(self.input_ids, self.attention_mask).n_predicted_tokens()


def batches(job: ScoringJob, desc: str, own_gradients: bool = False):
    """This process's calibration batches (every batch in one process; under torchrun this
    rank's share, which a metric adds up with ``job.ranks.sum_``). ``own_gradients``: the metric
    needs each batch's gradient on its own (squares of per-sequence gradients, a difference of
    two gradients at one probe), which gradients summed over ranks that ran other batches
    cannot give: with sharded weights every rank takes every batch and computes its own rows."""
    n_batches = math.ceil(len(job.blocks) / job.batch_size)
    split = not (own_gradients and job.ranks.sharded)
    mine = job.ranks.my_batches(n_batches, split)
    factor = job.ranks.gradient_factor if split else 1.0  # unsplit: the ranks' mean is the sum
    device = input_device(job.model)
    start = time.perf_counter()
    for index in tqdm(mine, desc=desc, disable=job.progress != "bars", leave=False):
        counted = index is not None
        input_ids, attention_mask = job.blocks.batch(index if counted else 0, job.batch_size,
                                                     device)
        yield Batch(index if counted else 0, input_ids, attention_mask,
                    factor if counted else 0.0, counted)
    if job.progress == "lines":
        progress.line(f"{desc}: scoring pass over {len(mine)} batches of {job.batch_size} "
                      f"blocks done in {time.perf_counter() - start:.1f} s")


def loss_sum(model, input_ids, attention_mask) -> torch.Tensor:
    """Next-token NLL summed over the batch's valid positions (nats)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return masked_nll_sum(logits, input_ids, attention_mask)


def owner_layers(model, params) -> dict[str, list[tuple[torch.nn.Module, str | None]]]:
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
