"""Estimated device peak memory of the benchmark's passes, without a GPU and without running a
kernel (``scripts/benchmark.py --estimate-memory``).

The model of a ``random:<preset>`` is built inside ``FakeTensorMode`` on the CPU device (fake
tensors carry shapes and dtypes, no storage), and each figure runs the tool's own code on it
(``gradient_step``, ``compute_scores`` with a ``ScoringJob``, ``evaluate``) under a
``MemTracker``, which adds up every storage alive at each op: the figure's peak is the tracker's
peak, the model's weights and buffers included (as CUDA max allocated counts them).

Three adaptations, all outside the tool's code:

* A scalar read of a fake tensor (``.item()``, ``int()``, ``bool()``, ``.tolist()``) has no value
  to read: it reads True for a boolean, 1 for an integer, 1.0 for a float. Such values only
  scale results or pick a branch (a token count, a step size, "is the mask all ones"); True
  takes the all-ones masks of the benchmark's data.
* Hutchinson's host-memory moments are put on the meta device (``hutchinson.HOST``), so that the
  tracker counts them apart from the fake model's device (the CPU device): each figure reports
  its device peak and its host peak (``peak_host_memory_bytes``).
* The tracker's per-module attribution is off (its hooks refuse a second forward of the model in
  one tracked pass, which the finite-difference HVP makes, and gradient hooks on frozen weights):
  only the total is read.

Attention: the model is built with ``ATTENTION`` ("sdpa", what the real benchmark gets from
transformers); on fake CPU tensors SDPA takes the fused (flash-style) kernel's shapes, no
sequence x sequence matrix, as flash / memory-efficient attention on a GPU. hutchinson_diag's
double backward switches to eager attention itself (src/sensitivity/hutchinson.py), so its
estimate includes the eager attention matrices. One batch per figure: a pass's peak repeats per
batch (accumulators are allocated before the first). Not estimated: ranking, perturbation and
quantization (they work on stored scores, not in a forward or backward pass).

Sharded (``--estimate-shard-over N``): one rank's device peak when the model is sharded over N
ranks as ``--shard`` shards it (``sharding.shard_model``: FSDP2 ``fully_shard`` per decoder block,
then the root), without processes: rank 0 of N on torch's fake process group (backend "fake":
every collective returns at once and moves no data), a device mesh over N on the CPU device, and
the fake model sharded inside the fake mode, so each parameter is a DTensor whose local shard is a
fake tensor of 1/N of its rows. The passes are those of ``benchmark.py --shard`` on rank 0: the
tool's own sharded paths (``Ranks`` with ``sharded``: padding passes, every batch on every rank
for grad_squared and the finite differences, sums over ranks, the gradient factor), forward
under ``no_grad`` as the sharded tool runs it, the shardable metrics only, and hutchinson_diag
by finite differences only (the double backward is refused under --shard). Every rank runs the
same shapes and FSDP2 pads every rank's shard to ⌈rows/N⌉ rows, so rank 0's peak is every
rank's. The tracker is torch's ``FSDPMemTracker``, which counts FSDP2's all-gather
and reduce-scatter buffers and the unsharded weights of the blocks gathered at each op. Two
adaptations more, both here:

* A collective that returns Python objects (``Ranks.all_gather_objects``: evaluation's per-block
  sums, Hutchinson's top-K candidates) returns rank 0's object for every rank: the fake process
  group moves no bytes, so there is nothing else to read, and the ranks are alike in shape.
  Tensor collectives (``sum_``, ``reduced``) run on the fake group and leave the tensors as they
  are; a value read from them is a scalar read (above).
* FSDPMemTracker refuses a second forward of the root module in one tracked pass (it takes it
  for the next training iteration); the finite-difference HVP makes two per probe, so the root's
  per-module statistics restart at each forward. Only the total is read, as above.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import wraps

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.utils._python_dispatch import TorchDispatchMode

from src.bench.figures import hutchinson_variants
from src.bench.measure import random_blocks
from src.bench.reference import gradient_step, scored_gradients_kept
from src.distributed import sharding
from src.distributed.ranks import Ranks
from src.errors import UserError
from src.eval.perplexity import evaluate
from src.sensitivity.eligibility import eligible_parameters
from src.sensitivity import hutchinson
from src.sensitivity.hutchinson import (HutchinsonSettings, moments_belong_on_host,
                                        parameter_groups, uses_hutchinson)
from src.sensitivity.metrics import METRICS, compute_scores
from src.sensitivity.scoring import ScoringJob

ATTENTION = "sdpa"
DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float32": torch.float32}


class _PeakTracker(MemTracker):
    """MemTracker without per-module attribution (see the module docstring)."""

    def _pre_fw_hook(self, module, inputs) -> None:
        pass

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass


class _ShardedPeakTracker(FSDPMemTracker):
    """FSDPMemTracker that takes more than one forward of the root module in one tracked pass
    (see the module docstring)."""

    def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
        inner = super()._fsdp_state_pre_forward(fsdp_mod, orig_fsdp_state_pre_fw)

        @wraps(inner)
        def restarted(*args, **kwargs):
            if fsdp_mod is self._root_mod and not self._mod_tracker.is_bw:
                self.memory_tracking.pop(fsdp_mod, None)
            return inner(*args, **kwargs)

        return restarted


@dataclass(frozen=True)
class _FakeRanks(Ranks):
    """Rank 0 of a fake process group: an object collective returns rank 0's object for every
    rank (see the module docstring)."""

    def all_gather_objects(self, obj) -> list:
        return [obj] * self.world_size


class _ConstantScalars(TorchDispatchMode):
    """A scalar read of a fake tensor: True, 1 or 1.0."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            tensor = args[0]
            if tensor.dtype == torch.bool:
                return True
            return 1.0 if tensor.is_floating_point() or tensor.is_complex() else 1
        return func(*args, **(kwargs or {}))


def kind(dtype: torch.dtype, attention: str = ATTENTION, world_size: int = 1) -> str:
    """The report's ``peak_memory_kind``."""
    tracker = "FSDPMemTracker" if world_size > 1 else "MemTracker"
    shards = (f", sharded over {world_size} ranks (one rank's peak)" if world_size > 1 else "")
    return (f"estimate (FakeTensorMode + {tracker}, {str(dtype).replace('torch.', '')}, "
            f"attention {attention}){shards}")


def fake_model(spec: str, dtype: torch.dtype, attention: str = ATTENTION):
    """(model, fake mode): ``random:<preset>`` built with fake weights inside the mode."""
    from transformers import AutoModelForCausalLM
    from src.models.loader import random_config

    if not spec.startswith("random:"):
        raise UserError(f"--estimate-memory needs a random:<preset> model (its shape without "
                        f"its weights), not {spec}")
    config, _ = random_config(spec[len("random:"):])
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=attention)
    model.eval()
    return model, mode


@contextmanager
def fake_ranks(world_size: int):
    """Rank 0 of ``world_size`` on torch's fake process group, sharded with a device mesh on the
    CPU device (the fake model's); the group is destroyed on exit."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UserError("--estimate-shard-over runs in a process without a process group "
                        "(not under torchrun)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        yield _FakeRanks(0, world_size, backend="fake", sharded=True, mesh=mesh)
    finally:
        dist.destroy_process_group()


def shard_fake(model, mode, ranks: Ranks) -> None:
    """``model`` (fake) sharded over ``ranks`` as --shard shards it, inside its fake mode."""
    with mode:
        sharding.shard_model(model, ranks)


@contextmanager
def _host_counted_apart(mode):
    """Under a fake mode, host-memory moments (hutchinson.HOST) go to the meta device: the fake
    model lives on the CPU device, so host memory would otherwise count as device memory."""
    if mode is None:
        yield
        return
    saved, hutchinson.HOST = hutchinson.HOST, torch.device("meta")
    try:
        yield
    finally:
        hutchinson.HOST = saved


def peak_bytes(model, run, mode=None) -> tuple[int, dict, int]:
    """(peak bytes, bytes by kind at the peak, peak host bytes) of ``run()`` on ``model``'s
    device, its weights and buffers included: ``mode`` the fake mode of a fake model (None: a
    real model, real kernels). Host bytes: Hutchinson's host-memory moments (fake runs only)."""
    tracker = _ShardedPeakTracker(model) if isinstance(model, FSDPModule) else _PeakTracker()
    device = next(model.parameters()).device
    with mode or nullcontext():
        tracker.track_external(model)
        with tracker, _ConstantScalars() if mode else nullcontext(), _host_counted_apart(mode):
            run()
    peaks = tracker.get_tracker_snapshot("peak")
    snapshot = peaks[device]
    host = peaks.get(torch.device("meta"), {}).get("Total", 0)
    breakdown = {str(getattr(k, "value", k)): v for k, v in snapshot.items() if v}
    return snapshot["Total"], breakdown, host


def passes(model, args, metrics: list[str], ranks: Ranks = Ranks()) -> dict:
    """name -> (run, batch size, note) of every estimated figure, on this rank's batches of
    ``ranks`` (one process: every batch)."""
    params = eligible_parameters(model)
    vocab = model.get_input_embeddings().num_embeddings
    blocks = random_blocks(args.batch_size, args.max_length, vocab, seed=1)
    ids, mask = blocks.batch(0, args.batch_size)

    def forward():
        with sharding.without_grad(ranks.sharded):
            model(input_ids=ids, attention_mask=mask)

    def forward_backward():
        with scored_gradients_kept(model, params):
            gradient_step(model, ids, mask)

    grad_mode = "no_grad" if ranks.sharded else "inference mode"
    figures = {"forward": (forward, args.batch_size, f"bare model forward, {grad_mode}"),
               "forward_backward": (forward_backward, args.batch_size,
                                    "bare forward+backward, kept gradient buffers")}
    for metric in metrics:
        for name, hvp in _variants(metric, args, ranks.sharded):
            size = (args.hutchinson_batch_size or args.batch_size) if hvp else args.batch_size
            data = random_blocks(size, args.max_length, vocab, seed=3)
            job = _job(model, params, data, size, args, hvp, ranks)
            note = f"compute_scores({metric})" + (
                ", gradient checkpointing" if args.gradient_checkpointing
                and METRICS[metric].gradients else "") + (
                f", 1 probe per batch, {hvp}, "
                f"{'block mode' if args.hutchinson_mode == 'block' else 'whole model'}, "
                f"moments on {_moments(args, params)}" if hvp else "")
            figures[name] = (lambda job=job, metric=metric: compute_scores(job, metric),
                             size if METRICS[metric].uses_data else None, note)
    figures["evaluate"] = (lambda: evaluate(model, blocks, args.batch_size, ranks=ranks),
                           args.batch_size, "NLL, accuracy, per-block sums")
    return figures


def _variants(metric: str, args, sharded: bool = False) -> list[tuple[str, str | None]]:
    """(figure name, HVP) of a metric: a Hutchinson metric once per HVP (auto: both; sharded:
    the finite difference, the only one that runs under --shard)."""
    if not uses_hutchinson(metric):
        return [(f"score_{metric}", None)]
    return hutchinson_variants(metric, args.hutchinson_hvp, sharded)


def _moments(args, params) -> str:
    """Where the Hutchinson figure's moments are estimated to live: ``auto`` decided by the
    tool's rule for a GPU of --estimate-gpu-gb (the fake model's device has no memory size), on
    the rows this rank holds."""
    if args.hutchinson_moments != "auto":
        return args.hutchinson_moments
    groups = parameter_groups(params, args.hutchinson_mode == "block")
    largest = max(sum(sharding.local(p).numel() for p in group.values()) for group in groups)
    return "host" if moments_belong_on_host(8 * largest, args.estimate_gpu_gb * 1e9) else "device"


def _job(model, params, data, batch_size: int, args, hvp: str | None,
         ranks: Ranks = Ranks()) -> ScoringJob:
    settings = {}
    if hvp:
        settings[HutchinsonSettings] = HutchinsonSettings(
            hutchinson_samples=1, hutchinson_block=args.hutchinson_mode == "block",
            hutchinson_hvp=hvp, hutchinson_moments=_moments(args, params))
    return ScoringJob(model, params, data, batch_size=batch_size, seed=0, settings=settings,
                      ranks=ranks, gradient_checkpointing=args.gradient_checkpointing)


def estimate_figure(model, mode, run, batch_size: int, max_length: int, note: str) -> dict:
    """One figure: its estimated peak, or the error that stopped the fake pass."""
    started = time.perf_counter()
    try:
        peak, breakdown, host = peak_bytes(model, run, mode)
    except Exception as error:  # a pass fake tensors cannot run: reported, never guessed
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
                "peak_memory_bytes": None, "note": note}
    return {"peak_memory_bytes": peak, "peak_memory_breakdown": breakdown,
            "peak_host_memory_bytes": host,
            "batch_size": batch_size, "tokens": batch_size and batch_size * max_length, "note": note,
            "estimate_seconds": time.perf_counter() - started}


def run(args) -> dict:
    """The --estimate-memory report: the benchmark's keys where they mean something; with
    --estimate-shard-over N, one rank's of N."""
    if args.estimate_shard_over:
        with fake_ranks(args.estimate_shard_over) as ranks:
            return _report(args, ranks)
    return _report(args, Ranks())


def _report(args, ranks: Ranks) -> dict:
    started = time.perf_counter()
    dtype = DTYPES[args.dtype]
    model, mode = fake_model(args.model, dtype)
    if ranks.sharded:
        shard_fake(model, mode, ranks)
    metrics = [m for m in args.metrics.split(",")
               if m in METRICS and (not ranks.sharded or METRICS[m].shardable)]
    figures = {}
    for name, (fn, size, note) in passes(model, args, metrics, ranks).items():
        figures[name] = estimate_figure(model, mode, fn, size, args.max_length, note)
        print(f"[bench] {name}: {_gb(figures[name])}", flush=True)
    n_parameters = sum(p.numel() for p in model.parameters())
    peaks = [f["peak_memory_bytes"] or 0 for f in figures.values()]
    return {
        "world_size": ranks.world_size, "estimate": True,
        "model": {"spec": args.model, "n_parameters": n_parameters,
                  "dtype": str(dtype).replace("torch.", ""), "device": "none (estimate)",
                  "attention": ATTENTION},
        **({"sharding": sharding.describe(ranks, model)} if ranks.sharded else {}),
        "batch_size": args.batch_size, "max_length": args.max_length,
        "hutchinson_batch_size": args.hutchinson_batch_size or args.batch_size,
        "device": "none (estimate)", "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peak_memory_kind": kind(dtype, world_size=ranks.world_size),
        "peak_memory_bytes": max(peaks),
        "wall_seconds": time.perf_counter() - started, "figures": figures,
    }


def _gb(figure: dict) -> str:
    if "error" in figure:
        return f"not estimated ({figure['error'][:80]})"
    return f"{figure['peak_memory_bytes'] / 1e9:.2f} GB"


def table(figures: dict) -> str:
    lines = [f"{'figure':<40}{'batch':>6}{'est. peak GB':>14}{'host GB':>9}  note"]
    for name, figure in figures.items():
        peak = figure["peak_memory_bytes"]
        size = figure.get("batch_size") or "-"
        shown = f"{peak / 1e9:.2f}" if peak else "ERROR"
        host = figure.get("peak_host_memory_bytes")
        lines.append(f"{name:<40}{size:>6}{shown:>14}{host / 1e9 if host else 0:>9.2f}  "
                     f"{figure.get('error') or figure['note']}")
    return "\n".join(lines)
