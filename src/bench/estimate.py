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
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from src.bench.figures import hutchinson_variants
from src.bench.measure import random_blocks
from src.bench.reference import gradient_step, scored_gradients_kept
from src.errors import UserError
from src.eval.perplexity import evaluate
from src.sensitivity.eligibility import eligible_parameters
from src.sensitivity import hutchinson
from src.sensitivity.hutchinson import HutchinsonSettings, moments_belong_on_host, parameter_groups
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


class _ConstantScalars(TorchDispatchMode):
    """A scalar read of a fake tensor: True, 1 or 1.0."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            tensor = args[0]
            if tensor.dtype == torch.bool:
                return True
            return 1.0 if tensor.is_floating_point() or tensor.is_complex() else 1
        return func(*args, **(kwargs or {}))


def kind(dtype: torch.dtype, attention: str = ATTENTION) -> str:
    """The report's ``peak_memory_kind``."""
    return (f"estimate (FakeTensorMode + MemTracker, {str(dtype).replace('torch.', '')}, "
            f"attention {attention})")


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
    tracker = _PeakTracker()
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


def passes(model, args, metrics: list[str]) -> dict:
    """name -> (run, batch size, note) of every estimated figure."""
    params = eligible_parameters(model)
    vocab = model.get_input_embeddings().num_embeddings
    blocks = random_blocks(args.batch_size, args.max_length, vocab, seed=1)
    ids, mask = blocks.batch(0, args.batch_size)

    def forward():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    def forward_backward():
        with scored_gradients_kept(model, params):
            gradient_step(model, ids, mask)

    figures = {"forward": (forward, args.batch_size, "bare model forward, inference mode"),
               "forward_backward": (forward_backward, args.batch_size,
                                    "bare forward+backward, kept gradient buffers")}
    for metric in metrics:
        for name, hvp in _variants(metric, args):
            size = (args.hutchinson_batch_size or args.batch_size) if hvp else args.batch_size
            data = random_blocks(size, args.max_length, vocab, seed=3)
            job = _job(model, params, data, size, args, hvp)
            note = f"compute_scores({metric})" + (
                ", gradient checkpointing" if args.gradient_checkpointing
                and METRICS[metric].gradients else "") + (
                f", 1 probe per batch, {hvp}, "
                f"{'block mode' if args.hutchinson_mode == 'block' else 'whole model'}, "
                f"moments on {_moments(args, params)}" if hvp else "")
            figures[name] = (lambda job=job, metric=metric: compute_scores(job, metric),
                             size if METRICS[metric].uses_data else None, note)
    figures["evaluate"] = (lambda: evaluate(model, blocks, args.batch_size), args.batch_size,
                           "NLL, accuracy, per-block sums")
    return figures


def _variants(metric: str, args) -> list[tuple[str, str | None]]:
    """(figure name, HVP) of a metric: hutchinson_diag once per HVP (auto: both)."""
    if metric != "hutchinson_diag":
        return [(f"score_{metric}", None)]
    return hutchinson_variants(args.hutchinson_hvp, sharded=False)


def _moments(args, params) -> str:
    """Where the Hutchinson figure's moments are estimated to live: ``auto`` decided by the
    tool's rule for a GPU of --estimate-gpu-gb (the fake model's device has no memory size)."""
    if args.hutchinson_moments != "auto":
        return args.hutchinson_moments
    groups = parameter_groups(params, args.hutchinson_mode == "block")
    largest = max(sum(p.numel() for p in group.values()) for group in groups)
    return "host" if moments_belong_on_host(8 * largest, args.estimate_gpu_gb * 1e9) else "device"


def _job(model, params, data, batch_size: int, args, hvp: str | None) -> ScoringJob:
    settings = {}
    if hvp:
        settings[HutchinsonSettings] = HutchinsonSettings(
            hutchinson_samples=1, hutchinson_block=args.hutchinson_mode == "block",
            hutchinson_hvp=hvp, hutchinson_moments=_moments(args, params))
    return ScoringJob(model, params, data, batch_size=batch_size, seed=0, settings=settings,
                      gradient_checkpointing=args.gradient_checkpointing)


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
    """The --estimate-memory report: the benchmark's keys where they mean something."""
    started = time.perf_counter()
    dtype = DTYPES[args.dtype]
    model, mode = fake_model(args.model, dtype)
    metrics = [m for m in args.metrics.split(",") if m and m in METRICS]
    figures = {}
    for name, (fn, size, note) in passes(model, args, metrics).items():
        figures[name] = estimate_figure(model, mode, fn, size, args.max_length, note)
        print(f"[bench] {name}: {_gb(figures[name])}", flush=True)
    n_parameters = sum(p.numel() for p in model.parameters())
    peaks = [f["peak_memory_bytes"] or 0 for f in figures.values()]
    return {
        "world_size": 1, "estimate": True,
        "model": {"spec": args.model, "n_parameters": n_parameters,
                  "dtype": str(dtype).replace("torch.", ""), "device": "none (estimate)",
                  "attention": ATTENTION},
        "batch_size": args.batch_size, "max_length": args.max_length,
        "hutchinson_batch_size": args.hutchinson_batch_size or args.batch_size,
        "device": "none (estimate)", "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peak_memory_kind": kind(dtype), "peak_memory_bytes": max(peaks),
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
