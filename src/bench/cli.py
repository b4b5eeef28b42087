"""The command line of scripts/benchmark.py (src/bench/__init__.py)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from src.bench.figures import Bench  # noqa: E402
from src.bench.measure import CLOCKS, PeakMemory, table  # noqa: E402
from src.errors import UserError  # noqa: E402
from src.models.loader import load_model  # noqa: E402
from src.sensitivity.eligibility import eligible_parameters  # noqa: E402
from src.distributed import ranks as distributed  # noqa: E402
from src.sensitivity.hutchinson import HVPS, NOT_SHARDED, uses_hutchinson  # noqa: E402
from src.sensitivity.metrics import METRICS  # noqa: E402


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
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats of each figure's --steps batches: a figure reports "
                             "their median and spread (slowest - fastest) / median")
    parser.add_argument("--quant-bits", type=int, default=4,
                        help="bits of the round-to-nearest quantization figure")
    parser.add_argument("--rank-metric", default="grad_x_weight",
                        help="whose scores (on the warm-up batch) the top-K and perturbation "
                             "figures use")
    parser.add_argument("--hutchinson-batch-size", type=int,
                        help="batch size for the Hutchinson figure (default --batch-size)")
    parser.add_argument("--hutchinson-mode", choices=["whole", "block", "auto"], default="auto",
                        help="Hutchinson over the whole model at once, one transformer block at a "
                             "time (less memory, one pass per block), or whole and block mode "
                             "only if that runs out of GPU memory")
    parser.add_argument("--hutchinson-hvp", choices=HVPS, default="auto",
                        help="Hessian-vector product of the Hutchinson figure (as "
                             "phase1_runner_enhanced.py --hutchinson-hvp); --estimate-memory with "
                             "auto estimates both (--estimate-shard-over: finite_difference, "
                             "the only one under --shard)")
    parser.add_argument("--hutchinson-moments", choices=["auto", "device", "host"], default="auto",
                        help="where the Hutchinson figure keeps its running moments (as "
                             "phase1_runner_enhanced.py --hutchinson-moments); --estimate-memory "
                             "decides auto as on a GPU of --estimate-gpu-gb")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="the gradient metrics' figures with decoder blocks recomputed in the "
                             "backward (as phase1_runner_enhanced.py --gradient-checkpointing); "
                             "the forward+backward reference stays without")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="no timing and no kernels: estimate each figure's device peak memory "
                             "(forward, forward+backward, every metric's scoring pass, evaluation) "
                             "with fake tensors (random:<preset> models; --dtype auto = bfloat16; "
                             "src/bench/estimate.py)")
    parser.add_argument("--estimate-gpu-gb", type=float, default=80.0,
                        help="--estimate-memory: the GPU memory (GB) that --hutchinson-moments "
                             "auto decides for")
    parser.add_argument("--estimate-shard-over", type=int, metavar="N",
                        help="--estimate-memory: estimate one rank's device peak with the model "
                             "sharded over N ranks as --shard shards it (FSDP2, on torch's fake "
                             "process group: no processes, no GPUs; shardable metrics only, "
                             "hutchinson_diag by finite differences)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU time (for a CPU run on a shared, busy "
                             "machine; use with --threads 1)")
    parser.add_argument("--shard", action="store_true",
                        help="under torchrun: shard the model over the processes with FSDP2 and "
                             "time each rank on batches of its own (the forward, forward+backward, "
                             "shardable metrics and evaluation); tokens/s are all ranks' together")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.estimate_memory and (args.shard or args.device_map):
        parser.error("--estimate-memory estimates one process on one device: no --shard (for "
                     "a sharded estimate, --estimate-shard-over N) or --device-map")
    if args.estimate_shard_over is not None:
        check_shard_estimate(parser, args)
    unknown = [m for m in args.metrics.split(",") if m and m not in METRICS]
    if unknown:
        parser.error(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    for flag in ("batch_size", "max_length", "steps", "topk", "repeats"):
        if getattr(args, flag) < 1 or (flag == "max_length" and args.max_length < 2):
            parser.error(f"--{flag.replace('_', '-')} is too small")
    return args


def check_shard_estimate(parser, args) -> None:
    if not args.estimate_memory:
        parser.error("--estimate-shard-over needs --estimate-memory (under torchrun, time a "
                     "sharded run with --shard)")
    if args.estimate_shard_over < 2:
        parser.error("--estimate-shard-over needs at least 2 ranks")
    if args.hutchinson_hvp == "double_backward" and \
            any(uses_hutchinson(m) for m in args.metrics.split(",")):
        parser.error(f"--estimate-shard-over: {NOT_SHARDED}")


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ranks = distributed.join(args.device, shard=True) if args.shard else distributed.Ranks()
    device = str(ranks.device) if ranks.sharded else args.device
    model, _, info = load_model(args.model, dtype=args.dtype, device=device,
                                device_map=args.device_map, shard_over=ranks if ranks.sharded else None)
    say(ranks, f"[bench] {info['spec']} ({info['n_parameters'] / 1e6:.1f}M parameters, "
        f"{info['dtype']}, {info['device'] if not args.device_map else args.device_map}"
        f"{f', sharded over {ranks.world_size} processes' if ranks.sharded else ''}) built in "
        f"{time.perf_counter() - started:.1f} s")
    use_cuda = any(p.device.type == "cuda" for p in model.parameters())
    params = eligible_parameters(model)
    memory = PeakMemory(use_cuda)
    bench = Bench(model, params, args, memory, ranks)
    bench.forward()
    bench.forward_backward()
    metrics = [m for m in args.metrics.split(",") if m and (not ranks.sharded or METRICS[m].shardable)]
    for metric in metrics:
        bench.metric(metric)
    bench.evaluate()
    if not ranks.sharded:  # ranking, perturbation and quantization figures: one process
        bench.ranking_and_perturbation()
        bench.quantization()
    figures = dict(bench.figures)  # in the order they were timed
    return {
        "world_size": ranks.world_size,
        "model": info, "batch_size": args.batch_size, "max_length": args.max_length,
        "steps": args.steps, "warmup_batches": 1, "repeats": args.repeats, "clock": args.clock,
        "time_statistic": "median of repeats", "spread": "(slowest - fastest) / median",
        "ratio_statistic": "median over rounds of tokens/s / the ceiling's tokens/s, the ceiling "
                           "timed in the same rounds",
        "topk": args.topk,
        "tokens_per_figure": bench.tokens, "n_scored_weights": sum(p.numel() for p in params.values()),
        "device": (torch.cuda.get_device_name(0) if use_cuda else platform.processor() or "cpu"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__,
        "peak_memory_kind": memory.kind(),
        "peak_memory_bytes": max((f.get("peak_memory_bytes") or 0) for f in figures.values()),
        "wall_seconds": time.perf_counter() - started, "figures": figures,
    }


def say(ranks, line: str) -> None:
    if ranks.is_main:
        print(line, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate_memory:
        return main_estimate(args)
    try:
        report = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report["world_size"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    print(f"\n{report['model']['spec']}  batch {args.batch_size} x {args.max_length}, "
          f"{args.steps} timed batches (median of {args.repeats} repeats, {args.clock} clock; "
          f"spread = (slowest - fastest) / median), "
          f"{report['model']['dtype']} on {report['device']}, {report['threads']} threads")
    print(table(report["figures"]))
    print("ratio: median over the repeats of the figure's tokens/s against its ceiling's, the "
          "ceiling timed again in the same rounds (so not the ceiling row's tokens/s); spread "
          "beside it: (largest - smallest) / median of those ratios")
    if report["world_size"] > 1:
        print(f"{report['world_size']} processes, model sharded (FSDP2): seconds are the slowest "
              f"rank's, tokens/s all ranks' together (per rank: divide by "
              f"{report['world_size']}); peak memory is rank 0's")
    print(f"peak memory ({report['peak_memory_kind']}): {report['peak_memory_bytes'] / 2**20:.0f} MiB")
    return write_and_exit_status(report, args.json, "figures that failed")


def main_estimate(args) -> int:
    """--estimate-memory: the estimated peak of every figure, printed and in --json."""
    from src.bench import estimate
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = estimate.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\n{args.model}  batch {args.batch_size} x {args.max_length} "
          f"(Hutchinson metrics: batch {report['hutchinson_batch_size']}), "
          f"{report['peak_memory_kind']}, estimated in {report['wall_seconds']:.0f} s")
    print(estimate.table(report["figures"]))
    return write_and_exit_status(report, args.json, "figures not estimated")


def write_and_exit_status(report: dict, json_path, failed_label: str) -> int:
    """Write ``report`` to --json if given; 1 when a figure has an error (named), else 0."""
    if json_path:
        from src.utils.io import write_json
        write_json(json_path, report)
        print(f"[bench] wrote {json_path}")
    failed = [n for n, f in report["figures"].items() if "error" in f]
    if failed:
        print(f"[bench] {failed_label}: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
