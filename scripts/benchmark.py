#!/usr/bin/env python3
"""Throughput of the tool's hot paths against the same model's bare ceilings, in one process.

Figures (each timed after one warm-up call, the fastest of ``--repeats`` timed calls, with
``torch.cuda.synchronize`` around every timing):

* ``forward``           bare ``model(input_ids, attention_mask)`` under inference mode: the ceiling
                        for evaluation and ``act_mag``.
* ``forward_backward``  bare training step: every parameter requires grad, the model's own loss
                        (``labels=input_ids``), backward, gradients dropped: the ceiling for the
                        gradient metrics and Hutchinson.
* ``score_<metric>``    ``compute_scores`` for every metric in ``METRICS`` on the same blocks
                        (``hutchinson_diag`` with one probe per batch: its ratio is the cost of one
                        probe, first-order graph included, per token, relative to one fwd+bwd).
* ``evaluate``          ``src.eval.perplexity.evaluate`` (NLL, accuracy, per-block sums).
* ``topk_global`` / ``topk_per_tensor``  ``rank.top_k`` over every scored weight's scores.
* ``perturb_restore``   ``perturbed(..., "sign_flip")`` of the K globally selected weights and
                        their exact restore.

Throughput is tokens per second over ``--steps`` batches of ``--batch-size`` x ``--max-length``
random token ids; ``ratio`` = figure's tokens/s / ceiling's tokens/s (1.0 = no overhead over the
bare model). Peak memory per figure: CUDA max allocated (largest over visible GPUs), else the
process's peak RSS (reset per figure where Linux allows it, else the running peak).

Example: python scripts/benchmark.py --model random:llama-3.1-8b --dtype bfloat16 \\
             --batch-size 8 --max-length 512 --json results/bench.json
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from src.data.loading import TokenBlocks  # noqa: E402
from src.errors import UserError  # noqa: E402
from src.eval.perplexity import evaluate  # noqa: E402
from src.models.loader import load_model  # noqa: E402
from src.models.properties import input_device  # noqa: E402
from src.sensitivity.eligibility import eligible_parameters  # noqa: E402
from src.sensitivity.metrics import METRICS, compute_scores  # noqa: E402
from src.sensitivity.perturb import perturbed  # noqa: E402
from src.sensitivity.rank import top_k  # noqa: E402
from src.sensitivity.scoring import ScoringJob  # noqa: E402

# Which bare ceiling each scoring metric is compared with (default: forward_backward).
FORWARD_ONLY_METRICS = {"act_mag"}


# ----------------------------------------------------------------------------- measurement

def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of one figure: CUDA max allocated, else peak RSS of this process."""

    def __init__(self, use_cuda: bool):
        self.use_cuda = use_cuda
        self.rss_resettable = False

    def reset(self) -> None:
        gc.collect()
        if self.use_cuda:
            torch.cuda.empty_cache()
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
            return
        try:  # "5" resets VmHWM (the peak RSS) on Linux
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.rss_resettable = True
        except OSError:
            self.rss_resettable = False

    def peak_bytes(self) -> int:
        if self.use_cuda:
            return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        if self.rss_resettable:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def kind(self) -> str:
        if self.use_cuda:
            return "cuda_max_allocated"
        return "rss_peak_per_figure" if self.rss_resettable else "rss_peak_process"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, warm_data, data, repeats: int = 1, clock: str = "wall") -> float:
    """Seconds of ``fn(data)`` after one untimed warm-up call ``fn(warm_data)``: the fastest of
    ``repeats`` calls (the least disturbed by other processes on a shared machine). ``clock``:
    wall time, or this process's CPU time (user + system: what a CPU run costs, unaffected by
    other processes waiting for the same cores)."""
    now = CLOCKS[clock]
    fn(warm_data)
    best = math.inf
    for _ in range(repeats):
        synchronize()
        start = now()
        fn(data)
        synchronize()
        best = min(best, now() - start)
    return best


def random_blocks(n_blocks: int, length: int, vocab_size: int, seed: int) -> TokenBlocks:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n_blocks, length), generator=generator)
    return TokenBlocks(ids, torch.ones_like(ids))


# ----------------------------------------------------------------------------- the figures

class Bench:
    def __init__(self, model, params, args, memory: PeakMemory):
        self.model, self.params, self.args, self.memory = model, params, args, memory
        vocab = model.get_input_embeddings().num_embeddings
        n = args.batch_size * args.steps
        self.blocks = random_blocks(n, args.max_length, vocab, seed=1)
        self.warm_blocks = random_blocks(args.batch_size, args.max_length, vocab, seed=2)
        self.tokens = n * args.max_length
        self.figures: dict[str, dict] = {}
        self.scores = None

    def record(self, name: str, fn, warm_data=None, data=None, *, tokens: int | None = None,
               ceiling: str | None = None, note: str = "") -> dict:
        self.memory.reset()
        try:
            seconds = timed(fn, warm_data, data, self.args.repeats, self.args.clock)
        except torch.cuda.OutOfMemoryError as error:
            figure = {"error": f"out of memory: {str(error).splitlines()[0][:160]}",
                      "peak_memory_bytes": self.memory.peak_bytes(), "note": note}
            self.figures[name] = figure
            gc.collect()
            torch.cuda.empty_cache()
            print(f"[bench] {name}: OUT OF MEMORY", flush=True)
            return figure
        figure = {"seconds": seconds, "tokens": tokens,
                  "tokens_per_s": tokens / seconds if tokens else None,
                  "ceiling": ceiling, "ratio": None, "cost_x_ceiling": None,
                  "peak_memory_bytes": self.memory.peak_bytes(), "note": note}
        base = self.figures.get(ceiling or "", {}).get("tokens_per_s")
        if tokens and base:
            figure["ratio"] = figure["tokens_per_s"] / base
            figure["cost_x_ceiling"] = base / figure["tokens_per_s"]
        self.figures[name] = figure
        print(f"[bench] {name}: {seconds:.4f} s" +
              (f", {figure['tokens_per_s']:.1f} tok/s" if tokens else "") +
              (f", ratio {figure['ratio']:.3f} vs {ceiling}" if figure["ratio"] else ""), flush=True)
        return figure

    def batches(self, blocks):
        device = input_device(self.model)
        return list(blocks.batches(self.args.batch_size, device))

    def forward(self):
        batches, warm = self.batches(self.blocks), self.batches(self.warm_blocks)

        def run(items):
            with torch.inference_mode():
                for ids, mask in items:
                    self.model(input_ids=ids, attention_mask=mask)

        self._measure("forward", run, batches, warm, ceiling=None,
                      note="bare model forward, inference mode")

    def forward_backward(self):
        batches, warm = self.batches(self.blocks), self.batches(self.warm_blocks)
        saved = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(True)

        def run(items):
            for ids, mask in items:
                self.model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
                self.model.zero_grad(set_to_none=True)
        try:
            self._measure("forward_backward", run, batches, warm, ceiling=None,
                          note="bare training step: all parameters, model's own loss")
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(saved[n])

    def _measure(self, name, run, batches, warm, ceiling, note):
        self.record(name, run, warm, batches, tokens=self.tokens, ceiling=ceiling, note=note)

    def metric(self, metric: str, block_mode: bool = False):
        args = self.args
        uses_data = METRICS[metric].uses_data
        batch_size = args.batch_size
        blocks, warm = self.blocks, self.warm_blocks
        note = "" if uses_data else "no data: seconds for all scored weights"
        if metric == "hutchinson_diag":
            batch_size = args.hutchinson_batch_size or args.batch_size
            vocab = self.model.get_input_embeddings().num_embeddings
            blocks = random_blocks(batch_size * args.steps, args.max_length, vocab, seed=3)
            warm = random_blocks(batch_size, args.max_length, vocab, seed=4)
            block_mode = block_mode or args.hutchinson_mode == "block"
            note = (f"1 probe per batch of {batch_size}, "
                    + ("block mode (one pass per transformer block)" if block_mode
                       else "whole model") + "; cost_x_ceiling = cost of one probe per token "
                    "in fwd+bwd units")
        ceiling = "forward" if metric in FORWARD_ONLY_METRICS else "forward_backward"
        result = {}

        def run(data):
            result.clear()
            job = ScoringJob(self.model, self.params, data, batch_size=batch_size, seed=0,
                             hutchinson_samples=1, hutchinson_block=block_mode)
            result["scores"] = compute_scores(job, metric).scores

        tokens = len(blocks) * args.max_length if uses_data else None
        figure = self.record(f"score_{metric}", run, warm, blocks, tokens=tokens,
                             ceiling=ceiling if uses_data else None, note=note)
        if metric == args.rank_metric and "scores" in result:
            self.scores = result["scores"]
        result.clear()
        if "error" in figure and metric == "hutchinson_diag" and not block_mode \
                and args.hutchinson_mode == "auto":
            print("[bench] hutchinson_diag: whole-model mode ran out of memory; block mode",
                  flush=True)
            self.metric(metric, block_mode=True)

    def evaluate(self):
        self.record("evaluate", lambda data: evaluate(self.model, data, self.args.batch_size),
                    self.warm_blocks, self.blocks, tokens=self.tokens, ceiling="forward",
                    note="NLL, accuracy, per-block sums")

    def ranking_and_perturbation(self):
        if self.scores is None:
            self.scores = compute_scores(ScoringJob(self.model, self.params, self.warm_blocks,
                                                    self.args.batch_size), "magnitude").scores
        n_weights = sum(s.numel() for s in self.scores.values())
        k = self.args.topk
        selection = {}

        def global_top(_):
            selection["global"] = top_k(self.scores, k, "global")

        self.record("topk_global", global_top,
                    note=f"exact global top-{k} of {n_weights} weights ({self.args.rank_metric})")
        self.record("topk_per_tensor", lambda _: top_k(self.scores, k, "per_tensor"),
                    note=f"top-{k} in each of {len(self.scores)} tensors")

        def flip(_):
            with perturbed(self.params, selection["global"], "sign_flip"):
                pass

        self.record("perturb_restore", flip, note=f"sign_flip of {k} weights and exact restore")
        self.scores = None


# ----------------------------------------------------------------------------- report

def table(figures: dict) -> str:
    lines = [f"{'figure':<24}{'seconds':>11}{'tokens/s':>13}{'ratio':>8}  {'vs':<17}{'peak MiB':>10}"]
    for name, f in figures.items():
        peak = f"{f['peak_memory_bytes'] / 2**20:.0f}" if f.get("peak_memory_bytes") else "-"
        if "error" in f:
            lines.append(f"{name:<24}{'ERROR':>11}  {f['error'][:50]}  {peak}")
            continue
        tps = f"{f['tokens_per_s']:.1f}" if f["tokens_per_s"] else "-"
        ratio = f"{f['ratio']:.3f}" if f["ratio"] is not None else "-"
        lines.append(f"{name:<24}{f['seconds']:>11.4f}{tps:>13}{ratio:>8}  "
                     f"{f['ceiling'] or '':<17}{peak:>10}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Throughput of scoring, evaluation, ranking and perturbation against the same "
                    "model's bare forward and forward+backward (ratios in one process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="random:tiny-llama",
                        help="model spec as for phase1_runner_enhanced.py --model")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per block")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed batches per figure (after one warm-up batch)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device-map", help="auto|balanced|sequential or a JSON map file")
    parser.add_argument("--metrics", default=",".join(METRICS),
                        help="comma-separated metrics to time")
    parser.add_argument("--topk", type=int, default=500, help="K for top-K and perturb+restore")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each figure this many times and keep the fastest (for shared, "
                             "noisy machines)")
    parser.add_argument("--rank-metric", default="grad_x_weight",
                        help="whose scores the top-K and perturbation figures use")
    parser.add_argument("--hutchinson-batch-size", type=int,
                        help="batch size for the Hutchinson figure (default --batch-size)")
    parser.add_argument("--hutchinson-mode", choices=["whole", "block", "auto"], default="auto",
                        help="Hutchinson over the whole model at once, one transformer block at a "
                             "time (less memory, one pass per block), or whole and block mode "
                             "only if that runs out of GPU memory")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU time (for a CPU run on a shared, busy "
                             "machine; use with --threads 1)")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    unknown = [m for m in args.metrics.split(",") if m and m not in METRICS]
    if unknown:
        parser.error(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    for flag in ("batch_size", "max_length", "steps", "topk", "repeats"):
        if getattr(args, flag) < 1 or (flag == "max_length" and args.max_length < 2):
            parser.error(f"--{flag.replace('_', '-')} is too small")
    return args


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, _, info = load_model(args.model, dtype=args.dtype, device=args.device,
                                device_map=args.device_map)
    print(f"[bench] {info['spec']} ({info['n_parameters'] / 1e6:.1f}M parameters, {info['dtype']}, "
          f"{info['device'] if not args.device_map else args.device_map}) built in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    use_cuda = any(p.device.type == "cuda" for p in model.parameters())
    params = eligible_parameters(model)
    memory = PeakMemory(use_cuda)
    bench = Bench(model, params, args, memory)
    bench.forward()
    bench.forward_backward()
    metrics = [m for m in args.metrics.split(",") if m]
    ordered = [args.rank_metric] * (args.rank_metric in metrics) + \
        [m for m in metrics if m != args.rank_metric]
    for metric in ordered:
        bench.metric(metric)
        if metric == args.rank_metric:
            bench.ranking_and_perturbation()
    if args.rank_metric not in metrics:
        bench.ranking_and_perturbation()
    bench.evaluate()
    figures = {name: bench.figures[name] for name in
               ["forward", "forward_backward", *[f"score_{m}" for m in metrics], "evaluate",
                "topk_global", "topk_per_tensor", "perturb_restore"]}
    return {
        "model": info, "batch_size": args.batch_size, "max_length": args.max_length,
        "steps": args.steps, "warmup_batches": 1, "repeats": args.repeats, "clock": args.clock,
        "topk": args.topk,
        "tokens_per_figure": bench.tokens, "n_scored_weights": sum(p.numel() for p in params.values()),
        "device": (torch.cuda.get_device_name(0) if use_cuda else platform.processor() or "cpu"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__,
        "peak_memory_kind": memory.kind(),
        "peak_memory_bytes": max((f.get("peak_memory_bytes") or 0) for f in figures.values()),
        "wall_seconds": time.perf_counter() - started, "figures": figures,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\n{report['model']['spec']}  batch {args.batch_size} x {args.max_length}, "
          f"{args.steps} timed batches (best of {args.repeats}, {args.clock} clock), "
          f"{report['model']['dtype']} on {report['device']}, {report['threads']} threads")
    print(table(report["figures"]))
    print(f"peak memory ({report['peak_memory_kind']}): {report['peak_memory_bytes'] / 2**20:.0f} MiB")
    if args.json:
        from src.utils.io import write_json
        write_json(args.json, report)
        print(f"[bench] wrote {args.json}")
    failed = [n for n, f in report["figures"].items() if "error" in f]
    if failed:
        print(f"[bench] figures that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
