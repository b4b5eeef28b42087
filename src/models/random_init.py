"""The weights of a random preset (``--model random:<preset>``).

Every parameter is drawn from seeded streams of its own, ``ROWS_PER_STREAM`` rows per stream, so a
process that holds only some rows of a weight (``--shard``) draws exactly those rows, without
the rest of the tensor or the rest of the model, and gets the values a single process gets.
The streams are drawn on the device the weights live on (a GPU draws 8B values in well under a
second; a CPU thread takes over a minute), so the values depend on the seed and the device type.

The distribution is the one Hugging Face initialises these architectures with: weight matrices
and embeddings N(0, initializer_range²) (GPT-2's residual projections ``c_proj`` scaled by
1/sqrt(2·n_layer)), norm weights 1, biases 0.
"""
from __future__ import annotations

import math

import torch

from src.utils.seeds import stable_seed
from src.distributed.sharding import local, local_rows

ROWS_PER_STREAM = 256
INIT_SEED = 0


def initialize_(model: torch.nn.Module) -> None:
    """Draw every parameter of ``model`` (the part this process holds), in place."""
    config = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            held = local(param)
            if held.numel() == 0:
                continue
            std = _std(name, param, config)
            if std is None:
                held.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            rows = local_rows(param)
            for row, drawn in _row_pieces(name, param.shape, rows, std, held.device):
                held[row - rows.start:row - rows.start + len(drawn)].copy_(drawn)


def _std(name: str, param, config) -> float | None:
    """The normal's standard deviation, or None for a vector (a bias or a norm weight)."""
    if param.ndim < 2:
        return None
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", 0.02)
    if config.model_type == "gpt2" and name.endswith("c_proj.weight"):
        std /= math.sqrt(2 * config.n_layer)
    return std


def _row_pieces(name: str, shape, rows: range, std: float, device: torch.device):
    """(first row, float32 values) for each stream's part of ``rows``, one stream at a time."""
    row_numel = math.prod(shape[1:])
    first, last = rows.start // ROWS_PER_STREAM, (rows.stop - 1) // ROWS_PER_STREAM
    for stream in range(first, last + 1):
        start = stream * ROWS_PER_STREAM
        n_rows = min(ROWS_PER_STREAM, shape[0] - start)
        generator = torch.Generator(device).manual_seed(stable_seed(INIT_SEED, name, stream))
        drawn = torch.randn(n_rows, row_numel, generator=generator, device=device).mul_(std)
        begin = max(rows.start, start)
        yield begin, drawn[begin - start:rows.stop - start].view(-1, *shape[1:])
