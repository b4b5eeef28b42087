"""Sharded models (``torchrun ... --shard``): FSDP2 gives each rank 1/N of every weight.

``fully_shard`` wraps every decoder block and the root. Each parameter becomes a DTensor cut
along dim 0 into torch.chunk pieces: rank r holds rows [r·c, min((r+1)·c, rows)), c = ⌈rows/N⌉
(the last ranks may hold fewer rows, or none). A forward all-gathers one block's weights just
before the block runs and frees them after; a backward reduce-scatters each gradient, so rank r
receives the *mean over ranks* of its rows' gradients. Gloo has no pre-multiplied sum, so instead
of a divide factor every loss is multiplied by N: the reduced gradient is then the sum over ranks.

Every rank runs the same pipeline on its share of the blocks (src/distributed/ranks.py: ``Ranks``
with ``sharded``, padding passes included). Scores stay sharded: a rank holds the float32 scores
of the rows it holds; ``Layout`` says where each tensor's values live.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from src.distributed.ranks import Ranks, current
from src.errors import UserError

BLOCK_LIST_NAMES = ("layers", "h", "blocks", "layer")  # the ModuleList of decoder blocks


def whole_on_main(part: torch.Tensor, shape, ranks: Ranks) -> torch.Tensor | None:
    """The whole tensor of shape ``shape`` from every rank's rows (``part``, this rank's), on
    rank 0; None on the others. A collective: every rank calls it, tensor by tensor."""
    import torch.distributed as dist

    per_rank = math.ceil(shape[0] / ranks.world_size)
    padded = torch.zeros((per_rank, *shape[1:]), dtype=part.dtype, device=ranks.device)
    padded[:part.shape[0]] = part
    pieces = [torch.empty_like(padded) for _ in range(ranks.world_size)] if ranks.is_main \
        else None
    dist.gather(padded, pieces, dst=0)
    return torch.cat(pieces)[:shape[0]] if ranks.is_main else None


def ranks_of(model: torch.nn.Module) -> Ranks | None:
    """The Ranks ``model`` is sharded over, or None when it is not sharded."""
    return current() if is_sharded(next(model.parameters())) else None


@dataclass(frozen=True)
class Layout:
    """Where the values of sharded tensors live: each tensor's global size and the flat range
    of its values this rank holds (rows are contiguous, so a flat range)."""
    ranks: Ranks
    numel: dict[str, int]
    offset: dict[str, int]

    @classmethod
    def of(cls, params: dict, ranks: Ranks) -> "Layout":
        return cls(ranks, {n: p.numel() for n, p in params.items()},
                   {n: flat_offset(p) for n, p in params.items()})

    def localize(self, name: str, local_numel: int, flat_index: torch.Tensor):
        """(positions in ``flat_index`` held here, their local flat indices)."""
        start = self.offset[name]
        held = (flat_index >= start) & (flat_index < start + local_numel)
        return held, flat_index[held] - start

    def values_at(self, requests: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """name -> float64 CPU values at global flat indices, from (this rank's part of the
        tensor, indices) per name; the same on every rank. One all-reduce for all names: each
        rank fills the values it holds into zeros, and x + 0 is exact."""
        names = list(requests)
        lengths = [int(requests[n][1].numel()) for n in names]
        filled = torch.zeros(sum(lengths), dtype=torch.float64)
        start = 0
        for name, length in zip(names, lengths):
            part, flat_index = requests[name]
            part = part.detach().reshape(-1)
            held, local_index = self.localize(name, part.numel(), flat_index.cpu())
            window = filled[start:start + length]
            window[held] = part[local_index.to(part.device)].double().cpu()
            start += length
        on_device = filled.to(self.ranks.device)  # NCCL reduces CUDA tensors only
        self.ranks.sum_([on_device])
        return dict(zip(names, on_device.cpu().split(lengths)))


def describe(ranks: Ranks, model: torch.nn.Module) -> dict:
    """The manifest's record of the sharding, with the parameter bytes rank 0 holds."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
    held = sum(local(p).numel() * p.element_size() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"engine": "FSDP2 fully_shard (each decoder block, then the root)",
            "placement": "dim 0 (rows), torch.chunk pieces", "world_size": ranks.world_size,
            "nodes": max(1, ranks.world_size // max(per_node, 1)), "backend": ranks.backend,
            "parameter_bytes_held_by_rank_0": held, "parameter_bytes_total": total}


def shard_model(model: torch.nn.Module, ranks: Ranks) -> None:
    """fully_shard every decoder block, then the root (embeddings, final norm, output head)."""
    from torch.distributed.fsdp import fully_shard

    for block in decoder_blocks(model):
        fully_shard(block, mesh=ranks.mesh)
    # the root too frees its gathered weights (embeddings, output head) after each forward:
    # evaluation is forward-only, and a whole output head per process is what --shard avoids
    fully_shard(model, mesh=ranks.mesh, reshard_after_forward=True)


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            return module
    raise UserError(f"no list of decoder blocks found in {type(model).__name__} (--shard and "
                    f"--gradient-checkpointing work block by block)")


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) tensor this process holds."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def row_range(param, rank: int, world_size: int) -> range:
    """Global dim-0 rows of ``param`` held by ``rank`` (torch.chunk pieces)."""
    rows = param.shape[0]
    per_rank = math.ceil(rows / world_size)
    return range(min(rank * per_rank, rows), min((rank + 1) * per_rank, rows))


def local_rows(param) -> range:
    """Global dim-0 rows of ``param`` held here: all of them when it is not sharded."""
    if not is_sharded(param):
        return range(param.shape[0])
    mesh = param.device_mesh
    return row_range(param, mesh.get_local_rank(), mesh.size())


def held_rows(whole: torch.Tensor, param) -> torch.Tensor:
    """The rows held here of ``whole``, a tensor shaped like ``param`` (e.g. a draw for the whole
    tensor, which a sharded run then shares with one process)."""
    rows = local_rows(param)
    return whole if len(rows) == param.shape[0] else whole[rows.start:rows.stop].clone()


def flat_offset(param) -> int:
    """Flat index (into the full tensor) of the first value held here."""
    rows = local_rows(param)
    return rows.start * (param.numel() // max(param.shape[0], 1))


def without_grad(sharded: bool):
    """inference_mode, or no_grad for a sharded model: FSDP's unsharded weight buffers made
    under inference_mode could not take part in a later backward."""
    return torch.no_grad() if sharded else torch.inference_mode()
