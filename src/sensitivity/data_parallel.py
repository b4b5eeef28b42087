"""Data-parallel calibration under ``torchrun --nproc-per-node N phase1_runner_enhanced.py ...``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). Every rank loads
the same model (rank r on ``cuda:<LOCAL_RANK>``, or all on the CPU) and joins one process group:
NCCL on GPUs, gloo on the CPU.

Protocol. Rank 0 runs the whole pipeline. Whenever it scores with a data-using metric (the main
scoring, stability subsets, analyses that rescore), ``compute_scores`` first broadcasts the job
(metric, parameter names, token blocks, settings) and the other ranks, waiting in
``serve_scoring``, score the same job. Calibration batches are dealt out by batch index (rank r
takes batches r, r+N, r+2N, ...; the batches are the single-process batches, so Hutchinson probes
keyed by batch index are the same), and each metric all-reduces its float32 accumulators (sums of
gradients, squared gradients, activation norms, Hutchinson moments) before finishing. Token
counts are computed from the full block set on every rank, so every mean equals the
single-process one up to float summation order. When rank 0 is done it broadcasts a stop; the
other ranks write nothing and exit 0. If rank 0 fails, it exits non-zero and torchrun ends the
others.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from src.data.loading import TokenBlocks
from src.errors import UserError
from src.sensitivity.metrics import compute_scores
from src.sensitivity.scoring import ScoringJob

_STOP = "stop"
_current: "DataParallel | None" = None


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_batches(self, n_batches: int) -> range:
        """Global indices of this rank's calibration batches."""
        return range(self.rank, n_batches, self.world_size)

    def all_reduce_sum_(self, tensors) -> None:
        """In-place sum over ranks of each tensor (all ranks call this in the same order)."""
        import torch.distributed as dist

        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def sum_scalars(self, values: list[float]) -> list[float]:
        """Sums over ranks of a few float64 numbers (one collective)."""
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        self.all_reduce_sum_([tensor])
        return tensor.tolist()

    def announce(self, job, metric: str) -> None:
        """Rank 0: send a scoring job to the other ranks (no-op elsewhere)."""
        if self.is_main:
            _broadcast(_request(job, metric))


def from_environment(device: str) -> DataParallel | None:
    """The process group of this torchrun rank (joined on first call), or None when not
    launched by torchrun with more than one process."""
    global _current
    if _current is not None:
        return _current
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or "RANK" not in os.environ:
        return None
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = rank_device(device, local_rank).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if on_gpu else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
    _current = DataParallel(rank, world_size, local_rank, backend)
    return _current


def current() -> DataParallel | None:
    """The data-parallel group joined by ``from_environment``, if any."""
    return _current


def rank_device(device: str, local_rank: int | None = None) -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` for auto/cuda when GPUs are visible, else cpu."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
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
    return str(rank_device(device)) if _current is not None else device


@contextmanager
def main_first():
    """Under torchrun, rank 0 runs the block first (e.g. building the built-in model's cache) and
    the other ranks after it, so they never write the same files at once; no-op otherwise."""
    import torch.distributed as dist

    if _current is not None and not _current.is_main:
        dist.barrier()
    yield
    if _current is not None and _current.is_main:
        dist.barrier()


def serve_scoring(model) -> dict:
    """Ranks > 0: score every job rank 0 announces, until it says stop. Writes nothing."""
    group = _current
    named = dict(model.named_parameters())
    n_jobs = 0
    while True:
        request = _broadcast(None)
        if request == _STOP:
            return {"rank": group.rank, "jobs_served": n_jobs}
        blocks = TokenBlocks(request["input_ids"], request["attention_mask"])
        job = ScoringJob(model=model, params={n: named[n] for n in request["params"]},
                         blocks=blocks, data_parallel=group, **request["settings"])
        compute_scores(job, request["metric"])
        n_jobs += 1


def finish(release_servers: bool = True) -> None:
    """End of a successful run: rank 0 tells the others to stop serving (not in a sharded run,
    where every rank runs the pipeline); every rank leaves the group."""
    global _current
    if _current is None:
        return
    import torch.distributed as dist

    if _current.is_main and release_servers:
        _broadcast(_STOP)
    dist.destroy_process_group()
    _current = None


def _request(job, metric: str) -> dict:
    skip = {"model", "params", "blocks", "data_parallel", "progress"}
    return {"metric": metric, "params": list(job.params),
            "input_ids": job.blocks.input_ids.cpu(), "attention_mask": job.blocks.attention_mask.cpu(),
            "settings": {k: v for k, v in vars(job).items() if k not in skip}}


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    device = torch.device("cuda", _current.local_rank) if _current.backend == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]
