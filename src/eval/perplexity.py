"""evaluate(model, blocks) -> token-mean NLL (nats), perplexity, token accuracy, token count.

Conventions: position t of a block predicts token t+1; a position counts only when both tokens
are real (attention mask 1), so padding never counts. ``nll`` is the mean negative
log-likelihood per predicted token in nats, ``perplexity = exp(nll)`` (``inf`` when it
overflows; a non-finite token loss, e.g. from a model whose weights were flipped to inf/NaN, is
counted as an infinite loss), and ``token_accuracy`` is the share of predicted tokens whose
argmax equals the true next token.

The per-block sums are kept (``block_nll_sum``, ``block_tokens``) for bootstrap intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from src.data.loading import TokenBlocks
from src.models.properties import input_device
from src.distributed.ranks import Ranks, current
from src.distributed.sharding import without_grad


@dataclass
class EvalResult:
    nll: float
    perplexity: float
    token_accuracy: float
    n_tokens: int
    block_nll_sum: torch.Tensor  # [n_blocks] float64, on CPU
    block_tokens: torch.Tensor   # [n_blocks] int64, on CPU

    def summary(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll,
                "token_accuracy": self.token_accuracy, "n_tokens": self.n_tokens}


# Rows of logits upcast to float32 at a time by the NLL: bounds its temporary memory.
NLL_CHUNK_ELEMENTS = 1 << 24


class ChunkedNLL(torch.autograd.Function):
    """NLL of ``targets`` under row-wise softmax of ``logits`` [N, V], computed in float32 (float64
    for float64 logits) a chunk of rows at a time with fused (log-)softmax kernels. Saves only the logits in their own dtype and
    writes the logits' gradient once: no full-size float32 copy, saved log-probabilities or
    zero-filled gradient. The backward is itself differentiable (double backward for
    Hessian-vector products)."""

    @staticmethod
    def forward(ctx, logits, targets):
        nll = torch.empty(logits.shape[0], dtype=_nll_dtype(logits), device=logits.device)
        for rows in _row_chunks(logits):
            log_probs = torch.log_softmax(logits[rows], dim=-1, dtype=nll.dtype)
            nll[rows] = log_probs.gather(1, targets[rows, None]).squeeze(1).neg_()
        ctx.save_for_backward(logits, targets)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        logits, targets = ctx.saved_tensors
        differentiable = torch.is_grad_enabled()  # create_graph=True: record, out of place
        grad = None if differentiable else torch.empty_like(logits)
        parts = []
        for rows in _row_chunks(logits):
            probs = torch.softmax(logits[rows], dim=-1, dtype=_nll_dtype(logits))
            minus_one = probs.new_full((probs.shape[0], 1), -1.0)
            if differentiable:
                parts.append((probs.scatter_add(1, targets[rows, None], minus_one)
                              * grad_nll[rows, None]).to(logits.dtype))
            else:
                probs.scatter_add_(1, targets[rows, None], minus_one)
                torch.mul(probs, grad_nll[rows, None], out=grad[rows])  # fused cast on write
        return (torch.cat(parts) if differentiable else grad), None


def _nll_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 logits (a float64 model keeps its precision)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_chunks(logits: torch.Tensor):
    step = max(1, NLL_CHUNK_ELEMENTS // max(logits.shape[1], 1))
    return [slice(start, start + step) for start in range(0, logits.shape[0], step)]


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Per-position next-token NLL (float32, differentiable) and its validity mask, both [B, L-1].

    Computed on all L positions of the contiguous logits (the last position's value is discarded),
    which avoids copying the shifted logits."""
    input_ids = input_ids.to(logits.device)
    attention_mask = attention_mask.to(logits.device)
    batch, length, vocab = logits.shape
    targets = torch.roll(input_ids, -1, dims=1).reshape(-1)  # last column: discarded below
    nll = ChunkedNLL.apply(logits.reshape(batch * length, vocab), targets)
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    return nll.view(batch, length)[:, :-1], valid


def masked_nll_sum(logits, input_ids, attention_mask) -> torch.Tensor:
    """Sum of next-token NLL over valid positions: the loss that scoring differentiates."""
    nll, valid = token_nll(logits, input_ids, attention_mask)
    return (nll * valid).sum()


def evaluate(model, blocks: TokenBlocks, batch_size: int, progress: bool = False,
             ranks: Ranks | None = None) -> EvalResult:
    """Token-mean NLL, perplexity and next-token accuracy over ``blocks``. Under torchrun
    (``ranks``, by default the run's) each rank evaluates its share of the batches and the
    per-block sums are gathered: the same result on every rank."""
    ranks = ranks or current()
    device = input_device(model)
    n_batches = math.ceil(len(blocks) / batch_size)
    per_batch = {}
    with without_grad(ranks.sharded):
        for index in tqdm(ranks.my_batches(n_batches), desc="evaluate", disable=not progress,
                          leave=False):
            input_ids, attention_mask = blocks.batch(0 if index is None else index, batch_size,
                                                     device)
            sums = _block_sums(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits,
                               input_ids, attention_mask)
            if index is not None:  # None: a padding pass (sharded ranks run alike)
                per_batch[index] = tuple(part.cpu() for part in sums)
    per_batch = ranks.gathered(per_batch)
    nll_sum, tokens, correct = (torch.cat([per_batch[i][part] for i in range(n_batches)]).cpu()
                                for part in range(3))
    n_tokens = int(tokens.sum())
    mean_nll = float(nll_sum.sum()) / max(n_tokens, 1)
    accuracy = float(correct.sum()) / max(n_tokens, 1)
    return EvalResult(mean_nll, perplexity_of(mean_nll), accuracy, n_tokens, nll_sum, tokens)


def _block_sums(logits, input_ids, attention_mask):
    """Per block of the batch: NLL sum (float64; inf when a token's NLL is not finite), valid
    tokens, correctly predicted tokens."""
    nll, valid = token_nll(logits, input_ids, attention_mask)
    nll = torch.where(torch.isfinite(nll), nll, torch.full_like(nll, math.inf))
    correct = logits.argmax(dim=-1)[:, :-1] == input_ids[:, 1:].to(logits.device)
    return (torch.where(valid, nll.double(), 0.0).sum(dim=1), valid.sum(dim=1),
            (correct & valid).sum(dim=1))


def perplexity_of(mean_nll: float) -> float:
    """exp(nll), ``inf`` on overflow or a non-finite loss."""
    if not math.isfinite(mean_nll) or mean_nll > 709.0:
        return math.inf
    return math.exp(mean_nll)
