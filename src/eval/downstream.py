"""Zero-shot downstream tasks (HellaSwag, LAMBADA) scored as lm-evaluation-harness scores them.

Every task is reduced to log-likelihood requests ``(context, continuation)``. A request is
scored by one forward pass over ``context + continuation``: the summed log-probability of the
continuation tokens under teacher forcing (``loglik``) and whether every continuation token is
the model's argmax prediction (``is_greedy``).

Tokenization (the harness's ``HFLM``, 0.4.9.2 and later): trailing whitespace of the context is
moved to the front of the continuation; context + continuation are encoded together with the
tokenizer's default special tokens (so a tokenizer that adds BOS gets it, as in the harness),
and the continuation is what follows the context's own encoding; text that already starts with
the prefix token gets no special tokens. An empty context is the prefix token (BOS, else EOS)
before the continuation encoded without special tokens. The sequence is truncated from the left
so that at most ``max_length`` tokens are fed (position t predicts token t+1), ``max_length``
being the model's context size.

HellaSwag (``Rowan/hellaswag``, zero-shot): query = preprocess(activity_label + ": " + ctx_a +
" " + ctx_b.capitalize()); choice_i = preprocess(ending_i); continuation = " " + choice_i, where
preprocess strips, turns " [title]" into ". ", deletes bracketed artefacts (``[header]``,
``[step]`` ...) and collapses double spaces. ``acc``: argmax of loglik is the gold ending;
``acc_norm``: argmax of loglik / len(choice_i), the character length of the ending without the
leading space, exactly as the harness's ``completion_len``.

LAMBADA (OpenAI variant, ``EleutherAI/lambada_openai``): context = the text before its last
space, continuation = " " + the last word. ``acc``: every target token is the greedy prediction;
``perplexity`` = exp(-mean over items of the target loglik) (the harness's aggregation).

Standard errors are the harness's sample standard error of a mean of 0/1 scores,
sqrt(p(1-p)/(n-1)) (NaN for fewer than two items).

Damaged models are scored as the harness scores them: a NaN loglik stays NaN, ``argmax`` takes
the first NaN (numpy and torch treat NaN as the largest value), so a model whose outputs are all
NaN picks the first ending of every item (accuracy = the share of items whose gold ending is the
first, about chance) and LAMBADA perplexity is NaN. Read accuracy of a destroyed model together
with its perplexity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from src.data.task_items import TaskDataError, hellaswag_doc, lambada_split
from src.distributed.ranks import current
from src.distributed.sharding import without_grad
from src.eval.perplexity import perplexity_of
from src.models.properties import context_length, input_device

DEFAULT_MAX_LENGTH = 2048  # the harness's fallback when the model declares no context size


# ----------------------------------------------------------------------------- task definitions

def _hellaswag_requests(item: dict) -> list[tuple[str, str]]:
    query, choices, _ = hellaswag_doc(item)
    return [(query, " " + choice) for choice in choices]


def _hellaswag_metrics(items: list[dict], results: list[list[tuple[float, bool]]]) -> dict:
    acc, acc_norm = [], []
    for item, scored in zip(items, results):
        _, choices, gold = hellaswag_doc(item)
        lls = np.array([ll for ll, _ in scored], dtype=np.float64)
        lengths = np.array([float(len(c)) for c in choices])
        acc.append(float(int(np.argmax(lls)) == gold))
        acc_norm.append(float(int(np.argmax(lls / lengths)) == gold))
    return {"acc": _mean(acc), "acc_stderr": mean_stderr(acc),
            "acc_norm": _mean(acc_norm), "acc_norm_stderr": mean_stderr(acc_norm), "n": len(items)}


def _lambada_requests(item: dict) -> list[tuple[str, str]]:
    return [lambada_split(item["text"])]


def _lambada_metrics(items: list[dict], results: list[list[tuple[float, bool]]]) -> dict:
    lls = [scored[0][0] for scored in results]
    acc = [float(scored[0][1]) for scored in results]
    return {"acc": _mean(acc), "acc_stderr": mean_stderr(acc),
            "perplexity": perplexity(lls), "n": len(items)}


@dataclass(frozen=True)
class Task:
    """How a task is scored; adding a task is one entry here and one in
    src/data/task_items.py's ``TASK_SOURCES`` (where its items come from and how they are
    checked)."""
    name: str
    requests: Callable[[dict], list[tuple[str, str]]]  # (context, continuation) pairs of an item
    metrics: Callable[[list[dict], list[list[tuple[float, bool]]]], dict]


TASKS: dict[str, Task] = {
    "hellaswag": Task("hellaswag", _hellaswag_requests, _hellaswag_metrics),
    "lambada": Task("lambada", _lambada_requests, _lambada_metrics),
}


def get_task(task_name: str) -> Task:
    if task_name not in TASKS:
        raise TaskDataError(f"unknown downstream task '{task_name}'; available: {', '.join(TASKS)}")
    return TASKS[task_name]


# ----------------------------------------------------------------------------- metrics helpers

def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def mean_stderr(values: list[float]) -> float:
    """Sample standard error of the mean (ddof=1), sqrt(p(1-p)/(n-1)) for 0/1 values."""
    if len(values) < 2:
        return float("nan")
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def perplexity(logliks: list[float]) -> float:
    """exp(-mean(loglik)) as the harness aggregates it: NaN when a loglik is NaN, inf when it
    overflows or a loglik is -inf."""
    mean = float(np.mean(logliks)) if logliks else math.nan
    return math.nan if math.isnan(mean) else perplexity_of(-mean)


# ----------------------------------------------------------------------------- scoring

def model_max_length(model, tokenizer) -> int:
    """The context size the harness would use: model config, then tokenizer, then 2048."""
    from_config = context_length(getattr(model, "config", None))
    if from_config is not None:
        return from_config
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return value
    return DEFAULT_MAX_LENGTH


def prefix_token(tokenizer) -> int:
    """What stands before a continuation with an empty context: BOS, else EOS (the harness's
    ``prefix_token_id``)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("an empty context needs a BOS or EOS token, and the tokenizer has neither")


def encode_requests(tokenizer, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids (context, continuation) of each request, as the harness encodes them."""
    prefix = prefix_token(tokenizer)
    prefix_text = tokenizer.decode(prefix)
    encoded = []
    for context, continuation in requests:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if context:
            special = {"add_special_tokens": False} if context.startswith(prefix_text) else {}
            whole = tokenizer.encode(context + continuation, **special)
            context_ids = tokenizer.encode(context, **special)
            continuation_ids = whole[len(context_ids):]
        else:
            continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
            context_ids = [prefix]
            if continuation_ids and continuation_ids[0] == prefix:
                context_ids, continuation_ids = continuation_ids[:1], continuation_ids[1:]
        if not continuation_ids:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        encoded.append((context_ids, continuation_ids))
    return encoded


def _score_batch(model, sequences: list[list[int]], n_scored: list[int], device) -> list[tuple[float, bool]]:
    """Loglik and greedy flag of the last ``n_scored[i]`` tokens of each (right-padded) sequence."""
    lengths = torch.tensor([len(s) - 1 for s in sequences])
    width = int(lengths.max())
    tokens = torch.zeros(len(sequences), width + 1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = torch.tensor(seq)
    positions = torch.arange(width)[None, :]
    attention = positions < lengths[:, None]
    scored = attention & (positions >= (lengths - torch.tensor(n_scored))[:, None])
    logits = model(input_ids=tokens[:, :-1].to(device), attention_mask=attention.long().to(device),
                   use_cache=False).logits
    logprobs = torch.log_softmax(logits[scored.to(logits.device)].float(), dim=-1)
    targets = tokens[:, 1:][scored].to(logprobs.device)
    token_ll = logprobs.gather(-1, targets[:, None]).squeeze(-1).double()
    missed = logprobs.argmax(-1) != targets  # NaN rows: argmax is the first NaN, as in the harness
    rows = torch.arange(len(sequences))[:, None].expand_as(scored)[scored].to(logprobs.device)
    ll = torch.zeros(len(sequences), dtype=torch.float64, device=logprobs.device).index_add_(0, rows, token_ll)
    misses = torch.zeros(len(sequences), dtype=torch.long, device=logprobs.device).index_add_(0, rows, missed.long())
    return [(float(v), int(m) == 0) for v, m in zip(ll.tolist(), misses.tolist())]


def score_requests(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                   max_length: int | None = None, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(loglik, is_greedy) of each (context, continuation) request, in the order given. A
    torchrun: each process scores its share of the batches (as evaluation does), and every
    process gets every result."""
    ranks = current()
    with without_grad(ranks.sharded):
        return _score_requests(model, tokenizer, requests, batch_size, max_length, desc, ranks)


def _score_requests(model, tokenizer, requests, batch_size, max_length, desc, ranks):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_length = max_length or model_max_length(model, tokenizer)
    sequences, n_scored = [], []
    for context_ids, continuation_ids in encode_requests(tokenizer, requests):
        sequence = (context_ids + continuation_ids)[-(max_length + 1):]
        sequences.append(sequence)
        n_scored.append(min(len(continuation_ids), len(sequence) - 1))
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    device = input_device(model)
    per_batch = {}
    was_training = model.training
    model.eval()
    try:
        quiet = len(batches) < 2 or not ranks.is_main
        for index in tqdm(ranks.my_batches(len(batches)), desc=desc, leave=False,
                          disable=quiet):
            batch = batches[0 if index is None else index]  # None: a padding pass (sharded)
            scores = _score_batch(model, [sequences[i] for i in batch], [n_scored[i] for i in batch], device)
            if index is not None:
                per_batch[index] = scores
    finally:
        model.train(was_training)
    results: list[tuple[float, bool] | None] = [None] * len(sequences)
    for index, scores in ranks.gathered(per_batch).items():
        for request, score in zip(batches[index], scores):
            results[request] = score
    return results


def evaluate_task(model, tokenizer, task_name: str, items: list[dict], batch_size: int = 8) -> dict:
    """Metrics of one task over ``items`` (as returned by ``load_task_items``)."""
    task = get_task(task_name)
    if not items:
        raise TaskDataError(f"no {task_name} items to evaluate")
    per_item = [task.requests(item) for item in items]
    flat = [request for requests in per_item for request in requests]
    scores = score_requests(model, tokenizer, flat, batch_size=batch_size, desc=task_name)
    grouped, start = [], 0
    for requests in per_item:
        grouped.append(scores[start:start + len(requests)])
        start += len(requests)
    return task.metrics(items, grouped)


def evaluate_tasks(model, tokenizer, items_by_task: dict[str, list[dict]], batch_size: int = 8) -> dict[str, dict]:
    """{task: metrics} for each task in ``items_by_task``."""
    return {name: evaluate_task(model, tokenizer, name, items, batch_size)
            for name, items in items_by_task.items()}
