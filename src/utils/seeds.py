"""Seeds: the one way this project derives a random stream from the user's seed."""
from __future__ import annotations

import zlib

import torch


def stable_seed(seed: int, *parts) -> int:
    """A seed that depends only on (seed, parts), the same in every process and run: the one
    way this project derives a stream from the user's seed (probes, random scores, random
    control draws, stochastic perturbations)."""
    text = "|".join(str(p) for p in (seed, *parts))
    return zlib.crc32(text.encode()) + (seed % 1000) * (1 << 32)


def generator_for(device, seed: int, *parts) -> torch.Generator:
    """A torch generator on ``device`` seeded with ``stable_seed(seed, *parts)``."""
    return torch.Generator(device=device).manual_seed(stable_seed(seed, *parts))
