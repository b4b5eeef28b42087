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


def input_device(model) -> torch.device:
    """Device that the model's inputs go to (the embedding's, also under a device_map)."""
    return model.get_input_embeddings().weight.device


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Per-position next-token NLL (float32, differentiable) and its validity mask, both [B, L-1]."""
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    nll = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), targets, reduction="none")
    return nll, valid


def masked_nll_sum(logits, input_ids, attention_mask) -> torch.Tensor:
    """Sum of next-token NLL over valid positions: the loss that scoring differentiates."""
    nll, valid = token_nll(logits, input_ids, attention_mask)
    return (nll * valid).sum()


@torch.inference_mode()
def evaluate(model, blocks: TokenBlocks, batch_size: int, progress: bool = False) -> EvalResult:
    device = input_device(model)
    block_nll, block_tokens, block_correct = [], [], []
    batches = blocks.batches(batch_size, device)
    n_batches = math.ceil(len(blocks) / batch_size)
    for input_ids, attention_mask in tqdm(batches, total=n_batches, desc="evaluate",
                                          disable=not progress, leave=False):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        nll, valid = token_nll(logits, input_ids, attention_mask)
        nll = torch.where(torch.isfinite(nll), nll, torch.full_like(nll, math.inf))
        correct = logits[:, :-1].argmax(dim=-1) == input_ids[:, 1:]
        block_nll.append(torch.where(valid, nll.double(), 0.0).sum(dim=1))
        block_tokens.append(valid.sum(dim=1))
        block_correct.append((correct & valid).sum(dim=1))
    nll_sum = torch.cat(block_nll).cpu()
    tokens = torch.cat(block_tokens).cpu()
    n_tokens = int(tokens.sum())
    mean_nll = float(nll_sum.sum()) / max(n_tokens, 1)
    accuracy = float(torch.cat(block_correct).sum()) / max(n_tokens, 1)
    return EvalResult(mean_nll, perplexity_of(mean_nll), accuracy, n_tokens, nll_sum, tokens)


def perplexity_of(mean_nll: float) -> float:
    """exp(nll), ``inf`` on overflow or a non-finite loss."""
    if not math.isfinite(mean_nll) or mean_nll > 709.0:
        return math.inf
    return math.exp(mean_nll)
