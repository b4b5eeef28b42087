"""Ranks: the processes a run is split over, and the little the rest of the tool asks of them.

One process is ``Ranks()``: rank 0 of 1, its batches are all batches and every sum over ranks
leaves its tensors as they are. Under ``torchrun --nproc-per-node N`` (RANK, WORLD_SIZE,
LOCAL_RANK set) every rank joins one process group (NCCL on GPUs, gloo on the CPU) and runs the
whole pipeline; rank 0 alone writes the output folder and the console. Work that reads data is
split by batch index: rank r takes batches r, r+N, ... (the single-process batches, so anything
keyed by batch index, e.g. Hutchinson probes, is the same), and code that sums over batches adds
its local sums up with ``sum_``: every mean equals the single-process one up to float summation
order. Data parallel: every rank holds the whole model. ``--shard`` (``sharded``): FSDP2 gives
each rank 1/N of every weight (src/distributed/sharding.py), and its collectives need every rank
to run as many forward and backward passes as the others, so a rank short of a batch gets a
padding pass (None in ``my_batches``) whose contribution is discarded.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from src.errors import UserError

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: torch.device = CPU  # where collectives take their tensors (NCCL: this rank's GPU)
    sharded: bool = False  # the model's weights are FSDP2 shards (--shard)
    mesh: object = field(default=None, compare=False, repr=False)  # FSDP2's device mesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def my_batches(self, n_batches: int, split: bool = True) -> list[int | None]:
        """The batch indices this process runs. Sharded, every rank gets as many (None pads);
        ``split=False``: every batch (a sharded rank that needs every sequence's gradient)."""
        if not split or not self.distributed:
            return list(range(n_batches))
        if not self.sharded:
            return list(range(self.rank, n_batches, self.world_size))
        steps = math.ceil(n_batches / self.world_size)
        return [index if index < n_batches else None
                for index in range(self.rank, steps * self.world_size, self.world_size)]

    @property
    def gradient_factor(self) -> float:
        """What a loss is multiplied by so that sharded gradients come back summed over ranks:
        FSDP's reduce-scatter averages them (gloo has no pre-multiplied sum)."""
        return float(self.world_size) if self.sharded else 1.0

    def sum_(self, tensors) -> None:
        """Each tensor (this rank's local sum) becomes the sum over ranks, in place."""
        self._all_reduce(tensors, "sum")

    def max_(self, tensors) -> None:
        self._all_reduce(tensors, "max")

    def sum_gradients_(self, tensors) -> None:
        """``sum_`` for sums of weight gradients, which FSDP's backward has already summed when
        the weights are sharded."""
        if not self.sharded:
            self.sum_(tensors)

    def _all_reduce(self, tensors, op: str) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        for tensor in tensors:
            if tensor.device == self.device:
                dist.all_reduce(tensor, op=reduce_op)
                continue
            # e.g. Hutchinson's moments in host memory under NCCL: reduced on the GPU, one
            # tensor at a time, and copied back
            on_device = tensor.to(self.device)
            dist.all_reduce(on_device, op=reduce_op)
            tensor.copy_(on_device)

    def reduced(self, parts: list[torch.Tensor], op: str = "sum") -> torch.Tensor:
        """Each part (a 0-d or 1-d tensor: this rank's share of a sum, or its maximum) over the
        ranks, as one float64 CPU tensor [n_parts, ...]: one collective, one host transfer."""
        stacked = torch.stack([part.to(self.device, torch.float64) for part in parts])
        self._all_reduce([stacked], op)
        return stacked.cpu()

    def gathered(self, per_batch: dict) -> dict:
        """{batch index: result} of every rank (picklable CPU results), the same on every rank."""
        if not self.distributed:
            return per_batch
        return {index: result for part in self.all_gather_objects(per_batch)
                for index, result in part.items()}

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on every rank."""
        return all(self.all_gather_objects(bool(flag)))

    def main_value(self, obj):
        """Rank 0's ``obj`` on every rank: a choice that leads to collectives (every rank must
        make the same), or what rank 0 read from the output folder (the others have none)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        shared = [obj]
        dist.broadcast_object_list(shared, src=0, device=self.device if self.backend == "nccl"
                                   else None)
        return shared[0]

    def all_gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def describe(self) -> dict | None:
        """The manifest's record of the process group (None for one process)."""
        if not self.distributed:
            return None
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                "backend": self.backend}


_joined: Ranks | None = None


def join(device: str, shard: bool = False) -> Ranks:
    """This process's Ranks: joins torchrun's process group on the first call (every later call
    returns the same); ``Ranks()`` when not launched by torchrun with several processes.
    ``shard``: the weights will be sharded over the ranks (exit 2 without torchrun)."""
    global _joined
    if _joined is None:
        _joined = _join_group(device)
    if shard and not _joined.distributed:
        raise UserError("--shard needs several processes: launch with torchrun "
                        "--nproc-per-node N phase1_runner_enhanced.py ... --shard")
    if shard and not _joined.sharded:
        from torch.distributed.device_mesh import init_device_mesh

        # a collective: every rank makes it here, before anything runs rank by rank
        mesh = init_device_mesh(_joined.device.type, (_joined.world_size,))
        _joined = Ranks(_joined.rank, _joined.world_size, _joined.local_rank, _joined.backend,
                        _joined.device, sharded=True, mesh=mesh)
    return _joined


def _join_group(device: str) -> Ranks:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or "RANK" not in os.environ:
        return Ranks()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on = rank_device(device, local_rank)
    if on.type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if on.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
    return Ranks(rank, world_size, local_rank, backend, on)


def current() -> Ranks:
    """The Ranks joined by ``join`` (``Ranks()`` before, or in one process)."""
    return _joined or Ranks()


def rank_device(device: str, local_rank: int | None = None) -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` for auto/cuda when GPUs are visible, else cpu."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return CPU
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible here; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun rank with LOCAL_RANK {local_rank} has no GPU "
                            f"({torch.cuda.device_count()} visible); use fewer --nproc-per-node")
        return torch.device("cuda", local_rank)
    raise UserError(f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; pass "
                    f"--device auto, cuda or cpu")


def device_for(device: str) -> str:
    """The --device value for this process: per-rank under torchrun, unchanged otherwise."""
    return str(rank_device(device)) if current().distributed else device


@contextmanager
def main_first():
    """Under torchrun, rank 0 runs the block first (e.g. building the built-in model's cache) and
    the other ranks after it, so they never write the same files at once; no-op otherwise."""
    import torch.distributed as dist

    ranks = current()
    if ranks.distributed and not ranks.is_main:
        dist.barrier()
    yield
    if ranks.distributed and ranks.is_main:
        dist.barrier()


def leave() -> None:
    """End of a run: every rank leaves the process group."""
    global _joined
    if _joined is None or not _joined.distributed:
        _joined = None
        return
    import torch.distributed as dist

    dist.destroy_process_group()
    _joined = None
