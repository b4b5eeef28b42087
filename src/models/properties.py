"""What a loaded model is: where its inputs go, its context length, hidden size and heads.

Read from the transformers config and the module tree, the same way for every architecture.
"""
from __future__ import annotations

import torch


def input_device(model) -> torch.device:
    """Device that the model's inputs go to (the input embedding's, also under a device_map)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def context_length(config) -> int | None:
    """Longest sequence the model takes, in tokens, from its config (None when it says none)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def hidden_size(model) -> int:
    """Width of the residual stream."""
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    return int(model.get_input_embeddings().weight.shape[1])


def attention_heads(config) -> tuple[int, int]:
    """(query heads, key/value heads) of a transformers config (n_kv = n_heads without GQA)."""
    n_heads = next(getattr(config, a) for a in ("num_attention_heads", "n_head", "n_heads")
                   if getattr(config, a, None))
    n_kv = next((getattr(config, a) for a in ("num_key_value_heads", "n_head_kv", "kv_n_heads")
                 if getattr(config, a, None)), n_heads)
    if getattr(config, "multi_query", False):
        n_kv = 1
    return int(n_heads), int(n_kv)
