"""Command line -> RunConfig (a frozen dataclass) -> pipeline.run. Exit codes: 0 ok, 2 bad input."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from src.analysis.super_weights import MAX_WEIGHTS as SUPER_WEIGHT_MAX, SPIKE_THRESHOLD
from src.errors import UserError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str = DEFAULT_MODEL
    revision: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    # data
    data_file: str | None = None
    dataset: str | None = None
    max_length: int = 256
    max_samples: int | None = 16
    batch_size: int = 4
    # scoring and ranking
    metric: str = "grad_x_weight"
    topk: int = 100
    mode: str = "per_layer"
    layers: str | None = None
    include_embeddings: bool = False
    save_scores: bool = False
    hutchinson_samples: int = 8
    hutchinson_block: bool = False
    # perturbation
    perturb: str | None = None
    controls: tuple[str, ...] = ("random_k", "bottom_k")
    perturb_scale: float = 0.1
    bit_position: str = "exponent-msb"
    perturb_prob: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    # stability
    stability_check: bool = False
    stability_fraction: float = 0.5
    stability_batches: int = 3
    # super weights (src/analysis/super_weights.py)
    super_weights: bool = False
    super_weight_max: int = SUPER_WEIGHT_MAX
    spike_threshold: float = SPIKE_THRESHOLD
    # advanced analysis (src/analysis)
    weight_analysis: bool = False
    clustering_method: str | None = None
    n_clusters: int | None = None
    dbscan_eps: float | None = None
    compare_metrics: tuple[str, ...] = ()
    architecture_analysis: bool = False
    temporal_stability: bool = False
    conditions_data: tuple[str, ...] = ()
    drift_threshold: float = 0.5
    temporal_k: tuple[int, ...] = ()
    advanced_perturbations: tuple[str, ...] = ()
    progressive_k: tuple[int, ...] = (1, 10, 100, 1000, 10000)
    target_components: tuple[str, ...] = ()
    target_layers: str | None = None
    # downstream tasks (src/eval/downstream.py)
    downstream_tasks: tuple[str, ...] = ()
    task_data: tuple[tuple[str, str], ...] = ()
    task_samples: int | None = None
    # plots (src/utils/visualize.py)
    save_plots: bool = False
    plot_formats: tuple[str, ...] = ("png",)
    # output
    out_dir: str = ""
    verbose: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    from src.sensitivity.metrics import METRICS
    from src.sensitivity.perturb import PERTURBATIONS

    parser = argparse.ArgumentParser(
        prog="phase1_runner_enhanced.py",
        description="Critical Weight Analysis: score every weight of a causal LM, rank the most "
                    "critical ones, perturb them against random-K and bottom-K controls, and "
                    "write tables, statistics and a manifest to --out-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL,
                       help="built-in smollm2-135m (offline), a hub id, a local folder, a .gguf "
                            "file, or random:<preset>|random:<config.json>")
    model.add_argument("--revision", help="hub revision (branch, tag or commit)")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="allow custom model code from the hub")
    model.add_argument("--cache-dir", help="cache folder (default $XDG_CACHE_HOME/critical-weight-analysis)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto = bfloat16 on CUDA, float32 on CPU")
    model.add_argument("--device-map",
                       help="spread the model over several devices with accelerate: auto, "
                            "balanced, balanced_low_0, sequential, or a JSON file mapping module "
                            "names to a GPU index, cuda:N or cpu (also for random:<preset>); "
                            "weights offloaded to disk/meta are refused. Not with torchrun")

    data = parser.add_argument_group("data")
    data.add_argument("--data-file", help="UTF-8 text: documents separated by blank lines, or one "
                                          "per line (default: the bundled corpus)")
    data.add_argument("--dataset", help="NAME[:CONFIG[:SPLIT]] through the datasets library, "
                                        "e.g. wikitext:wikitext-2-raw-v1:test")
    data.add_argument("--max-length", type=int, default=256, help="tokens per block")
    data.add_argument("--max-samples", type=int, default=16,
                      help="max blocks for calibration and for evaluation (each)")
    data.add_argument("--batch-size", type=int, default=4, help="blocks per forward pass")

    score = parser.add_argument_group("scoring and ranking")
    score.add_argument("--metric", default="grad_x_weight",
                       help=f"one of: {', '.join(METRICS)}")
    score.add_argument("--topk", type=int, default=100, help="K weights to select")
    score.add_argument("--mode", default="per_layer", choices=["per_layer", "global"],
                       help="K per weight tensor, or K over all scored weights")
    score.add_argument("--layers", help="only these block indices, e.g. 0-3,10")
    score.add_argument("--include-embeddings", action="store_true",
                       help="also score embeddings and the output head")
    score.add_argument("--save-scores", action="store_true",
                       help="write every score tensor to scores.safetensors")
    score.add_argument("--hutchinson-samples", type=int, default=8,
                       help="Rademacher probes per calibration batch (hutchinson_diag)")
    score.add_argument("--hutchinson-block", action="store_true",
                       help="hutchinson_diag one transformer block at a time (less memory)")

    perturb = parser.add_argument_group("perturbation")
    perturb.add_argument("--perturb", help=f"perturb the top-K and controls: {', '.join(PERTURBATIONS)}")
    perturb.add_argument("--controls", default="random_k,bottom_k",
                         help="control selections: random_k (alias random), bottom_k (alias bottom)"
                              ", comma-separated, or none")
    perturb.add_argument("--perturb-scale", type=float, default=0.1,
                         help="gauss_noise: noise sd relative to |w|")
    perturb.add_argument("--bit-position", default="exponent-msb",
                         help="bit_flip: sign, exponent-msb, mantissa-msb or a bit number")
    perturb.add_argument("--perturb-prob", type=float, default=1.0,
                         help="bit_flip: probability of flipping each selected weight")
    perturb.add_argument("--seeds", default="0,1,2",
                         help="comma-separated seeds: random-K draws, noise, stability subsets")

    stability = parser.add_argument_group("stability")
    stability.add_argument("--stability-check", action="store_true",
                           help="Jaccard/Spearman of top-K across seeds and calibration batches")
    stability.add_argument("--stability-fraction", type=float, default=0.5,
                           help="share of calibration blocks each seed rescores")
    stability.add_argument("--stability-batches", type=int, default=3,
                           help="disjoint calibration parts compared")

    add_analysis_arguments(parser)

    supers = parser.add_argument_group(
        "super weights", "single MLP output-projection weights behind massive activations "
                         "(Yu et al. 2024); results go to enhanced_analysis.json: super_weights")
    supers.add_argument("--super-weights", action="store_true",
                        help="hook every block's MLP output projection on the calibration "
                             "blocks, take (row = spiking output channel, col = largest input "
                             "channel) of the spiking layer, zero it and detect again; then zero "
                             "each candidate against same-tensor random (per --seeds) and "
                             "largest-|w| controls on the evaluation blocks, and report where "
                             "the confirmed ones rank under --metric")
    supers.add_argument("--super-weight-max", type=int, default=SUPER_WEIGHT_MAX,
                        help="--super-weights: stop after this many candidates")
    supers.add_argument("--spike-threshold", type=float, default=SPIKE_THRESHOLD,
                        help="--super-weights: a layer spikes when its largest |output| "
                             "activation is at least this many times the median over its output "
                             "channels of their peak |activation|")

    tasks = parser.add_argument_group(
        "downstream tasks", "HellaSwag / LAMBADA scored as lm-evaluation-harness does; with "
                            "--perturb also under every condition (downstream_results.json)")
    tasks.add_argument("--downstream-tasks", help="comma-separated: hellaswag, lambada")
    tasks.add_argument("--task-data",
                       help="TASK=PATH (JSONL in the public schema) or TASK=hub, comma-separated; "
                            "default: the bundled original sample sets (offline)")
    tasks.add_argument("--task-samples", type=int,
                       help="evaluate N items per task, picked deterministically (default: all)")

    plots = parser.add_argument_group("plots", "figures written to <out-dir>/plots/ at the end "
                                               "of the run (src/utils/visualize.py)")
    plots.add_argument("--save-plots", action="store_true",
                       help="draw the score distribution per component, the layer x component "
                            "heatmap, where the top-K weights sit, perturbation effects with "
                            "bootstrap intervals, stability, and the plots of optional analyses "
                            "that ran")
    plots.add_argument("--plot-format",
                       help="--save-plots: comma-separated file formats: png, pdf, svg "
                            "(default png)")

    output = parser.add_argument_group("output")
    output.add_argument("--out-dir", help="output folder (default results/<model>_<metric>_k<K>_<time>)")
    output.add_argument("--verbose", action="store_true", help="progress bars and more detail")
    return parser


def add_analysis_arguments(parser: argparse.ArgumentParser) -> None:
    """Advanced analyses (src/analysis); results go to enhanced_analysis.json, one key each.

    Options without a fixed default are SUPPRESSed (absent from the namespace unless given), so
    that giving one whose analysis is off can be reported; the help text states each default.
    """
    group = parser.add_argument_group(
        "advanced analysis", "results go to enhanced_analysis.json, one key per analysis")
    group.add_argument("--weight-analysis", action="store_true",
                       help="per-tensor sensitivity profiles (quantiles, share of score held by "
                            "the top 0.01%%/1%%), clustering of tensors by profile, and hotspots "
                            "(rows / input channels where top-K weights bunch up)")
    group.add_argument("--clustering-method", default=argparse.SUPPRESS, choices=["kmeans", "dbscan"],
                       help="how tensors are clustered by profile (default kmeans)")
    group.add_argument("--n-clusters", default=argparse.SUPPRESS, type=int, help="kmeans: number of clusters (default 4)")
    group.add_argument("--dbscan-eps", default=argparse.SUPPRESS, type=float,
                       help="dbscan: neighbourhood radius in standardised feature units "
                            "(default: 90th percentile of the 2nd-nearest-tensor distance)")
    group.add_argument("--compare-metrics", default=argparse.SUPPRESS,
                       help="comma-separated metrics to score the same calibration data with, "
                            "e.g. grad_x_weight,magnitude,act_mag: Spearman, top-K Jaccard and "
                            "per-layer correlation for every pair")
    group.add_argument("--architecture-analysis", action="store_true",
                       help="score mass, top-K counts and enrichment per component and per "
                            "layer; depth trend; q/k/v/o and MLP comparison (fused q/k/v split)")
    group.add_argument("--temporal-stability", action="store_true",
                       help="rescore under calibration prefixes, seed subsets and "
                            "--conditions-data files; pairwise Jaccard/Spearman and drift")
    group.add_argument("--conditions-data", default=argparse.SUPPRESS, nargs="+", metavar="FILE",
                       help="--temporal-stability: extra text files, one snapshot each")
    group.add_argument("--drift-threshold", default=argparse.SUPPRESS, type=float,
                       help="--temporal-stability: flag consecutive snapshots whose drift "
                            "(1 - top-K Jaccard) exceeds this (default 0.5)")
    group.add_argument("--temporal-k", default=argparse.SUPPRESS,
                       help="--temporal-stability: comma-separated K values to compare at "
                            "(default: --topk)")
    group.add_argument("--advanced-perturbations", default=argparse.SUPPRESS,
                       help="comma-separated: progressive (K-vs-perplexity curve, top-K vs "
                            "random-K), clustered (top-K of one tensor cluster at a time), "
                            "targeted (top-K of the --target-* set and of each targeted "
                            "component); method: --perturb, else zero")
    group.add_argument("--progressive-k", default=argparse.SUPPRESS,
                       help="progressive: comma-separated K values, capped at the eligible "
                            "weights (default 1,10,100,1000,10000)")
    group.add_argument("--target-components", default=argparse.SUPPRESS,
                       help="restrict the eligible weights of the whole run to these components, "
                            "e.g. mlp_down,attn_q")
    group.add_argument("--target-layers", default=argparse.SUPPRESS,
                       help="restrict the eligible weights of the whole run to these blocks, "
                            "e.g. 0-3,10 (intersected with --layers)")


ADVANCED_PERTURBATIONS = ("progressive", "clustered", "targeted")
ANALYSIS_OPTIONS = ("clustering_method", "n_clusters", "dbscan_eps", "compare_metrics",
                    "conditions_data", "drift_threshold", "temporal_k", "advanced_perturbations",
                    "progressive_k", "target_components", "target_layers")


def _analysis_fields(args: argparse.Namespace) -> dict:
    """Validated advanced-analysis settings; a setting that would have no effect is an error."""
    from src.analysis.advanced_perturbations import eligible_restriction
    from src.sensitivity.metrics import METRICS

    args = argparse.Namespace(**{**dict.fromkeys(ANALYSIS_OPTIONS), **vars(args)})

    compare = _name_list(args.compare_metrics, "--compare-metrics", METRICS)
    if args.compare_metrics is not None and len(compare) < 2:
        raise UserError("--compare-metrics needs at least two different metrics, e.g. "
                        "grad_x_weight,magnitude")
    advanced = _name_list(args.advanced_perturbations, "--advanced-perturbations",
                          ADVANCED_PERTURBATIONS)
    clusters_used = args.weight_analysis or "clustered" in advanced
    _needs(args.clustering_method, clusters_used, "--clustering-method",
           "--weight-analysis or --advanced-perturbations clustered")
    _needs(args.n_clusters, clusters_used and (args.clustering_method or "kmeans") == "kmeans",
           "--n-clusters", "--clustering-method kmeans with --weight-analysis or clustered")
    _needs(args.dbscan_eps, clusters_used and args.clustering_method == "dbscan",
           "--dbscan-eps", "--clustering-method dbscan")
    for flag, value in (("--conditions-data", args.conditions_data),
                        ("--drift-threshold", args.drift_threshold),
                        ("--temporal-k", args.temporal_k)):
        _needs(value, args.temporal_stability, flag, "--temporal-stability")
    _needs(args.progressive_k, "progressive" in advanced, "--progressive-k",
           "--advanced-perturbations progressive")
    targets = bool(args.target_components or args.target_layers)
    if "targeted" in advanced and not targets:
        raise UserError("--advanced-perturbations targeted needs --target-components and/or "
                        "--target-layers")
    if args.n_clusters is not None and args.n_clusters < 2:
        raise UserError(f"--n-clusters must be at least 2 (got {args.n_clusters})")
    if args.dbscan_eps is not None and args.dbscan_eps <= 0:
        raise UserError(f"--dbscan-eps must be > 0 (got {args.dbscan_eps})")
    drift = 0.5 if args.drift_threshold is None else args.drift_threshold
    if not 0.0 <= drift <= 1.0:
        raise UserError(f"--drift-threshold must be in [0, 1] (got {drift})")
    for path in args.conditions_data or ():
        if not Path(path).is_file():
            raise UserError(f"--conditions-data '{path}' does not exist or is not a file")
    progressive_k = _int_list(args.progressive_k, "--progressive-k") if args.progressive_k \
        else RunConfig.progressive_k
    temporal_k = _int_list(args.temporal_k, "--temporal-k") if args.temporal_k else ()
    for flag, values in (("--progressive-k", progressive_k), ("--temporal-k", temporal_k)):
        if any(k < 1 for k in values):
            raise UserError(f"{flag} values must be at least 1")
    target_components = tuple(x.strip() for x in (args.target_components or "").split(",")
                              if x.strip())
    eligible_restriction(args.layers, args.target_layers, target_components,
                         args.include_embeddings)  # validates names early
    return dict(weight_analysis=args.weight_analysis, clustering_method=args.clustering_method,
                n_clusters=args.n_clusters, dbscan_eps=args.dbscan_eps, compare_metrics=compare,
                architecture_analysis=args.architecture_analysis,
                temporal_stability=args.temporal_stability,
                conditions_data=tuple(args.conditions_data or ()), drift_threshold=drift,
                temporal_k=temporal_k, advanced_perturbations=advanced,
                progressive_k=progressive_k, target_components=target_components,
                target_layers=args.target_layers)


def _name_list(text: str | None, flag: str, allowed) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in (text or "").split(",") if x.strip()))
    for name in names:
        if name not in allowed:
            raise UserError(f"unknown {flag} entry '{name}'; choose from {', '.join(allowed)}")
    return names


def _needs(value, used: bool, flag: str, requirement: str) -> None:
    if value is not None and not used:
        raise UserError(f"{flag} has no effect without {requirement}")


def _check_super_weight_flags(args: argparse.Namespace) -> None:
    if not args.super_weights and (args.super_weight_max != SUPER_WEIGHT_MAX
                                   or args.spike_threshold != SPIKE_THRESHOLD):
        raise UserError("--super-weight-max and --spike-threshold have no effect without "
                        "--super-weights")
    if args.super_weight_max < 1:
        raise UserError(f"--super-weight-max must be at least 1 (got {args.super_weight_max})")
    if not args.spike_threshold > 1.0:
        raise UserError(f"--spike-threshold must be > 1: it is a ratio to the layer's median "
                        f"channel (got {args.spike_threshold})")


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"bad {flag} '{text}': use comma-separated integers like 0,1,2") from None
    if not values:
        raise UserError(f"{flag} needs at least one integer")
    return values


def _controls(text: str) -> tuple[str, ...]:
    from src.sensitivity.experiment import CONTROL_ALIASES

    if text.strip().lower() in ("", "none"):
        return ()
    names = []
    for item in text.split(","):
        item = item.strip()
        if item not in CONTROL_ALIASES:
            raise UserError(f"bad --controls entry '{item}': use random_k, bottom_k (or random, bottom)")
        names.append(CONTROL_ALIASES[item])
    return tuple(dict.fromkeys(names))


def _plot_formats(args: argparse.Namespace) -> tuple[str, ...]:
    if args.plot_format is None:
        return RunConfig.plot_formats
    if not args.save_plots:
        raise UserError("--plot-format has no effect without --save-plots")
    from src.utils.visualize import parse_formats  # matplotlib only when plotting

    return parse_formats(args.plot_format)


def default_out_dir(model: str, metric: str, topk: int) -> str:
    safe_model = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-") or "model"
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return str(Path("results") / f"{safe_model}_{metric}_k{topk}_{stamp}")


def _downstream_fields(args: argparse.Namespace) -> dict:
    from src.eval.downstream_step import parse_task_data, parse_task_names

    tasks = parse_task_names(args.downstream_tasks)
    if not tasks and (args.task_data or args.task_samples is not None):
        raise UserError("--task-data and --task-samples need --downstream-tasks")
    if args.task_samples is not None and args.task_samples < 1:
        raise UserError(f"--task-samples must be at least 1 (got {args.task_samples})")
    return {"downstream_tasks": tasks, "task_data": parse_task_data(args.task_data, tasks),
            "task_samples": args.task_samples}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    from src.sensitivity.metrics import METRICS
    from src.sensitivity.perturb import PERTURBATIONS, resolve_bit
    import torch

    if args.metric not in METRICS:
        raise UserError(f"unknown --metric '{args.metric}'; choose one of {', '.join(METRICS)}")
    if args.perturb and args.perturb not in PERTURBATIONS:
        raise UserError(f"unknown --perturb '{args.perturb}'; choose one of {', '.join(PERTURBATIONS)}")
    for flag, value, low in (("--topk", args.topk, 1), ("--max-length", args.max_length, 2),
                             ("--batch-size", args.batch_size, 1),
                             ("--hutchinson-samples", args.hutchinson_samples, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low} (got {value})")
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples must be at least 1 (got {args.max_samples})")
    if not 0.0 <= args.perturb_prob <= 1.0:
        raise UserError(f"--perturb-prob must be in [0, 1] (got {args.perturb_prob})")
    if args.perturb_scale < 0:
        raise UserError(f"--perturb-scale must be >= 0 (got {args.perturb_scale})")
    resolve_bit(args.bit_position, torch.float32)  # validates names and numbers early
    _check_super_weight_flags(args)
    if args.data_file and args.dataset:
        raise UserError("give either --data-file or --dataset, not both")
    out_dir = args.out_dir or default_out_dir(args.model, args.metric, args.topk)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--out-dir '{out_dir}' exists and is a file; choose a folder")
    return RunConfig(
        model=args.model, revision=args.revision, trust_remote_code=args.trust_remote_code,
        cache_dir=args.cache_dir, device=args.device, dtype=args.dtype, device_map=args.device_map,
        data_file=args.data_file, dataset=args.dataset, max_length=args.max_length,
        max_samples=args.max_samples, batch_size=args.batch_size, metric=args.metric,
        topk=args.topk, mode=args.mode, layers=args.layers,
        include_embeddings=args.include_embeddings, save_scores=args.save_scores,
        hutchinson_samples=args.hutchinson_samples, hutchinson_block=args.hutchinson_block,
        perturb=args.perturb, controls=_controls(args.controls), perturb_scale=args.perturb_scale,
        bit_position=args.bit_position, perturb_prob=args.perturb_prob,
        seeds=_int_list(args.seeds, "--seeds"), stability_check=args.stability_check,
        stability_fraction=args.stability_fraction, stability_batches=args.stability_batches,
        super_weights=args.super_weights, super_weight_max=args.super_weight_max,
        spike_threshold=args.spike_threshold,
        **_downstream_fields(args),
        save_plots=args.save_plots, plot_formats=_plot_formats(args),
        out_dir=out_dir, verbose=args.verbose, **_analysis_fields(args))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        from src.pipeline import run
        from src.utils import distributed
        run(config)
        distributed.finish()  # torchrun: rank 0 releases the other ranks
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: weights were restored; outputs written so far are intact", file=sys.stderr)
        return 130
    return 0
