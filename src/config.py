"""RunConfig: every setting of a run, each default stated once, and validate().

The fields below are the run's core flags (src/cli.py builds argparse from them); each analysis,
metric and perturbation adds its own flags through its ``Settings`` dataclass, declared next to it
and named in its registration (``settings_classes()``), kept in ``RunConfig.settings_by_class``.
Parsing reads no file: ``with_file_defaults`` then takes --metric from --scores-from. ``validate()`` checks every value and every combination that can be
checked without the model; src/loaded_checks.py checks the rest (K against the eligible weights,
the model's context, ...) in the pipeline, before the output folder is touched.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from src import resume
from src.analysis import registry
from src.errors import UserError
from src.eval.downstream import TASKS
from src.models.components import COMPONENTS
from src.models.builtin import BUILTIN_NAME
from src.models.device_map import resolve_device_map
from src.report import tracking
from src.options import (choice, folder, free_names, int_list, integer, integer_or_word,
                         name_list, number, option, parse_given, placed_options, text, text_file,
                         unused_options, unused_settings)
from src.sensitivity.eligibility import parse_layers, unscorable
from src.sensitivity.experiment import CONTROL_ALIASES
from src.sensitivity.metrics import METRICS, any_gradients, shardable_metrics
from src.sensitivity.perturb import PERTURBATIONS
from src.sensitivity import score_store
from src.sensitivity.rank import MODES
from src.utils import output

PLOT_FORMATS = ("png", "pdf", "svg")
MODE_ALIASES = {"per_layer": "per_tensor"}  # the name the first users asked for
GROUP_HELP = {
    "downstream tasks": "built-in HellaSwag / LAMBADA, scored as lm-evaluation-harness does, and "
                        "any harness task through the harness itself; with --perturb also under "
                        "every condition (downstream_results.json)",
    "plots": "figures written to <out-dir>/plots/ at the end of the run",
}


def _device(value: str, flag: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise UserError(f"bad {flag} '{value}': use auto, cpu, cuda or cuda:N")
    return value


def _layers(value: str, flag: str) -> str:
    try:
        parse_layers(value)
    except ValueError:
        raise UserError(f"bad {flag} '{value}': use indices and ranges like 0-3,10") from None
    return value


def _task_data(value: str, flag: str) -> tuple[tuple[str, str], ...]:
    """'hellaswag=PATH,lambada=hub' -> (("hellaswag", PATH), ("lambada", "hub"))."""
    pairs = []
    for item in value.split(","):
        task, sep, source = (part.strip() for part in item.partition("="))
        if not sep or not source or task not in TASKS:
            raise UserError(f"bad {flag} entry '{item}': use TASK=PATH or TASK=hub with TASK one "
                            f"of {', '.join(TASKS)}")
        pairs.append((task, source))
    return tuple(pairs)


def _perturbs(c: RunConfig) -> bool:
    return c.perturb is not None


def _controls_used(c: RunConfig) -> bool:
    return _perturbs(c) or c.quantize is not None or \
        c.analysis_enabled("clustered_perturbation") or c.analysis_enabled("targeted_perturbation")


def _quantizes(c: RunConfig) -> bool:  # faults on integer codes take --quantize's groups
    return c.quantize is not None or c.value("bit_format") != "native"


def subsets_used(c: RunConfig) -> bool:
    return c.stability_check or c.analysis_enabled("temporal_stability")


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str = option(BUILTIN_NAME, "built-in smollm2-135m (offline), a hub id, a local folder, "
                        "a .gguf file, or random:<preset>|random:<config.json>", group="model",
                        parse=text)
    revision: str | None = option(None, "hub revision (branch, tag or commit)", group="model",
                                  parse=text)
    trust_remote_code: bool = option(False, "allow custom model code from the hub", group="model")
    cache_dir: str | None = option(None, "cache folder (default $XDG_CACHE_HOME/critical-weight-"
                                   "analysis)", group="model", parse=text)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", group="model", parse=_device)
    dtype: str = option("auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or "
                        "float16", group="model",
                        parse=choice(("auto", "float32", "bfloat16", "float16")))
    device_map: str | None = option(
        None, "spread the model over several devices with accelerate: auto, balanced, "
        "balanced_low_0, sequential, or a JSON file mapping module names to a GPU index, cuda:N "
        "or cpu (also for random:<preset>); weights offloaded to disk/meta are refused. Not with "
        "torchrun", group="model", parse=text)
    shard: bool = option(False, "under torchrun: shard every weight over the processes with "
                         "FSDP2 (each holds 1/N); scoring, ranking, perturbation and evaluation "
                         "run on the shards", group="model")
    # data
    data_file: str | None = option(None, "UTF-8 text: documents separated by blank lines, or one "
                                   "per line (default: the bundled corpus)", group="data",
                                   parse=text_file)
    dataset: str | None = option(None, "NAME[:CONFIG[:SPLIT]] through the datasets library, e.g. "
                                 "wikitext:wikitext-2-raw-v1:test", group="data", parse=text)
    max_length: int = option(256, "tokens per block", group="data", parse=integer(2))
    max_samples: int = option(16, "max blocks for calibration and for evaluation (each)",
                              group="data", parse=integer(1))
    batch_size: int = option(4, "blocks per forward pass", group="data", parse=integer(1))
    # scoring and ranking
    metric: str = option("grad_x_weight", f"one of: {', '.join(METRICS)}",
                         group="scoring and ranking", parse=choice(tuple(METRICS)))
    topk: int = option(100, "K weights to select", group="scoring and ranking", parse=integer(1))
    mode: str = option("per_tensor", "per_tensor: K per weight tensor (alias per_layer, its "
                       "first name); global: K over all scored weights",
                       group="scoring and ranking", parse=choice(MODES, MODE_ALIASES))
    layers: str | None = option(None, "only these block indices, e.g. 0-3,10",
                                group="scoring and ranking", parse=_layers)
    target_layers: str | None = option(None, "restrict the eligible weights of the whole run to "
                                       "these blocks, e.g. 0-3,10 (intersected with --layers)",
                                       group="scoring and ranking", parse=_layers)
    target_components: tuple[str, ...] = option(
        (), "restrict the eligible weights of the whole run to these components, e.g. "
        "mlp_down,attn_q", group="scoring and ranking", parse=name_list(lambda: COMPONENTS))
    include_embeddings: bool = option(False, "also score embeddings and the output head",
                                      group="scoring and ranking")
    gradient_checkpointing: bool = option(False, "gradient metrics recompute each decoder "
        "block in the backward: one block's activations alive instead of all, for about one "
        "more forward (llama-3.1-8b, 8 x 512: grad_x_weight 72 -> 47 GB, estimated)",
        group="scoring and ranking", used_when=("a gradient metric", lambda c: any_gradients(
            (c.metric, *c.value("compare_metrics")))))
    scores_from: str | None = option(
        None, "a run folder or scores.safetensors whose scores this run uses instead of "
        "scoring (same model, weights and scored set; --metric defaults to theirs)",
        group="scoring and ranking", parse=text)
    scores_from_other_data: bool = option(
        False, "use the --scores-from scores even though they were computed on other "
        "calibration data (another --data-file/--dataset, --max-length or --max-samples, or "
        "changed text), which is refused otherwise: the top-K then comes from text this run "
        "does not evaluate on; the manifest (scores_source) and the report name that data",
        group="scoring and ranking",
        used_when=("--scores-from", lambda c: c.scores_from is not None))
    save_scores: bool = option(False, "keep scores.safetensors (every score tensor, written "
                               "right after scoring for --resume) after the run succeeds",
                               group="scoring and ranking")
    # perturbation
    perturb: str | None = option(None, f"perturb the top-K and controls: "
                                 f"{', '.join(PERTURBATIONS)}", group="perturbation",
                                 parse=choice(tuple(PERTURBATIONS)))
    controls: tuple[str, ...] = option(
        ("random_k", "bottom_k"), "control selections, comma-separated, or none: random_k "
        "(alias random: K weights drawn uniformly from the scored weights, anew per seed), "
        "bottom_k (alias bottom: the K lowest |score| among the weights the perturbation, or the "
        "quantization, changes in value, so not weights that are already 0 for zero or "
        "sign_flip); every condition records n_changed", group="perturbation",
        parse=name_list(lambda: ("random_k", "bottom_k"), CONTROL_ALIASES, none_word="none"),
        used_when=("--perturb, --quantize or --advanced-perturbations clustered/targeted",
                   _controls_used))
    seeds: tuple[int, ...] = option((0, 1, 2), "comma-separated distinct seeds in [0, 2^32): "
                                    "random-K draws, noise, stability subsets",
                                    group="perturbation",
                                    parse=int_list(0, 2**32 - 1, distinct=True))
    # compression
    quantize: int | None = option(
        None, "bits (2-8): round-to-nearest quantization of every scored weight, evaluated with "
        "nothing kept (rtn) and with the top-K, each --controls set and per --seeds random-K "
        "kept at full precision; recovery of the quantization loss per kept set "
        "(quantization_results.json)", group="compression", parse=integer(2, 8))
    quant_group: int | None = option(
        128, "consecutive input weights of one output row per quantization group, or row (one "
        "group per output row); the last group of a row is shorter when N does not divide the "
        "row length (its own range; a row shorter than N is one group), and the run says so",
        group="compression", parse=integer_or_word(1, "row"),
        used_when=("--quantize or --bit-format int8/int4", _quantizes))
    quant_symmetric: bool = option(
        False, "absmax quantization around zero instead of min-max with a zero point",
        group="compression", used_when=("--quantize or --bit-format int8/int4", _quantizes))
    # stability
    stability_check: bool = option(False, "Jaccard/Spearman of top-K across seeds and "
                                   "calibration batches", group="stability")
    stability_fraction: float = option(0.5, "share of calibration blocks each seed rescores "
                                       "(--stability-check, --temporal-stability)",
                                       group="stability", parse=number(0.0, 1.0, low_open=True),
                                       used_when=("--stability-check or --temporal-stability",
                                                  subsets_used))
    stability_batches: int = option(3, "disjoint calibration parts compared (--stability-check; "
                                    "prefixes for --temporal-stability)", group="stability",
                                    parse=integer(2),
                                    used_when=("--stability-check or --temporal-stability",
                                               subsets_used))
    # downstream tasks
    downstream_tasks: tuple[str, ...] = option((), "comma-separated: hellaswag, lambada",
                                               group="downstream tasks",
                                               parse=name_list(lambda: TASKS))
    task_data: tuple[tuple[str, str], ...] = option(
        (), "TASK=PATH (JSONL in the public schema) or TASK=hub, comma-separated; default: the "
        "bundled original sample sets (offline)", group="downstream tasks", parse=_task_data,
        used_when=("--downstream-tasks", lambda c: bool(c.downstream_tasks)))
    task_samples: int | None = option(None, "evaluate N items per task, picked deterministically "
                                      "(default: all)", group="downstream tasks",
                                      parse=integer(1),
                                      used_when=("--downstream-tasks",
                                                 lambda c: bool(c.downstream_tasks)))
    lm_eval_tasks: tuple[str, ...] = option(
        (), "comma-separated lm-evaluation-harness task or group names (e.g. arc_easy,piqa,"
        "winogrande,lambada_openai), scored by the harness itself on the model in memory, before "
        "and under every perturbation condition", group="downstream tasks", parse=free_names)
    lm_eval_include: str | None = option(
        None, "folder of task YAML files for the harness (its include_path), e.g. "
        "src/data/harness_tasks: tasks over local data run offline", group="downstream tasks",
        parse=folder, used_when=("--lm-eval-tasks", lambda c: bool(c.lm_eval_tasks)))
    lm_eval_limit: int | None = option(
        None, "items per harness task (default: all)", group="downstream tasks",
        parse=integer(1), used_when=("--lm-eval-tasks", lambda c: bool(c.lm_eval_tasks)))
    lm_eval_fewshot: int | None = option(
        None, "few-shot examples per harness task (default: each task's own setting)",
        group="downstream tasks", parse=integer(0),
        used_when=("--lm-eval-tasks", lambda c: bool(c.lm_eval_tasks)))
    lm_eval_batch_size: int | None = option(
        None, "harness batch size (default: --batch-size)", group="downstream tasks",
        parse=integer(1), used_when=("--lm-eval-tasks", lambda c: bool(c.lm_eval_tasks)))
    # plots
    save_plots: bool = option(False, "draw the score distribution per component, the layer x "
                              "component heatmap, where the top-K weights sit, perturbation "
                              "effects with bootstrap intervals, stability, and the plots of "
                              "optional analyses that ran", group="plots")
    plot_formats: tuple[str, ...] = option(
        ("png",), "comma-separated file formats: png, pdf, svg", group="plots",
        flag="--plot-format", parse=lambda value, flag: name_list(lambda: PLOT_FORMATS)(
            value.lower(), flag),
        used_when=("--save-plots", lambda c: c.save_plots))
    # output
    out_dir: str = option("", "output folder (default results/<model>_<metric>_k<K>_<time>); it "
                          "must not hold another run's files unless --overwrite",
                          group="output", parse=text, show_default=False)
    overwrite: bool = option(False, "replace the run in --out-dir: its files (what its manifest "
                             "lists, the output files by name, plots/) are removed once this run "
                             "starts; other files stay", group="output")
    resume: bool = option(False, "continue the unfinished run in --out-dir (same command): its "
                          "saved scores and finished conditions are kept, the rest runs",
                          group="output")
    verbose: bool = option(False, "progress bars and more detail, the libraries' own bars and "
                           "logging included", group="output")
    quiet: bool = option(False, "no progress output: by default a terminal shows bars and a log "
                         "(stderr not a terminal) gets one line per finished scoring pass and "
                         "per finished condition", group="output")
    # each analysis', metric's and perturbation's Settings instance, by settings class
    settings_by_class: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_flags(cls, given: dict) -> RunConfig:
        """A config from the flags given (argparse dest -> string, or True for a switch), the
        analyses' flags parsed first. Reads no file: ``with_file_defaults`` comes next."""
        placed = sorted(placed_options(cls, settings_classes()),
                        key=lambda entry: entry[0] is cls or entry[0].AFTER is not None)
        values = parse_given(placed, given)
        settings = {owner: owner(**values[owner]) for owner in settings_classes()}
        return cls(**values[cls], settings_by_class=settings)

    def with_file_defaults(self, metric_given: bool) -> RunConfig:
        """The defaults that parsing leaves, which read a file or the clock: without --metric,
        the metric of the --scores-from scores (UserError when the file holds none); without
        --out-dir, results/<model>_<metric>_k<K>_<time>."""
        config = self
        if config.scores_from and not metric_given:
            meta = score_store.read_meta(score_store.locate(config.scores_from))
            config = replace(config, metric=meta["metric"])
        if not config.out_dir:
            config = replace(config, out_dir=output.default_out_dir(config.model, config.metric,
                                                                    config.topk))
        return config

    def settings(self, settings_class):
        """The given settings of an analysis, metric or perturbation (their defaults when this
        config was built without)."""
        if settings_class not in self.settings_by_class:
            return settings_class()
        return self.settings_by_class[settings_class]

    def analysis_enabled(self, key: str) -> bool:
        analysis = registry.load()[key]
        return analysis.enabled(registry.settings_for(analysis, self))

    def value(self, name: str):
        """A setting by field name, core or of any settings class."""
        if name in {f.name for f in fields(self)}:
            return getattr(self, name)
        for settings_class in settings_classes():
            if name in {f.name for f in fields(settings_class)}:
                return getattr(self.settings(settings_class), name)
        raise KeyError(name)

    def _placed(self) -> list:
        """(holder, field, option) of every flag in --help and config.json order; the holder is
        this config or one of its settings."""
        return [(self if owner is type(self) else self.settings(owner), field, meta)
                for owner, field, meta in placed_options(type(self), settings_classes())]

    def to_dict(self) -> dict:
        """Flat (config.json): the core fields, the metrics' and perturbations' among them where
        they were core fields once, then every analysis' fields."""
        return {field.name: getattr(holder, field.name) for holder, field, _ in self._placed()}

    def validate(self) -> None:
        """Every check that needs no model; raises UserError with the first problem."""
        for problem in self.problems():
            raise UserError(problem)

    def problems(self):
        yield from unused_options([(holder, field, meta) for holder, field, meta in self._placed()
                                   if holder is self or holder.AFTER is not None], self)
        for settings_class in settings_classes():
            settings = self.settings(settings_class)
            if settings_class.AFTER is None:
                yield from unused_settings(settings, self)
            yield from settings.problems(self)
        yield from self._combination_problems()

    def _combination_problems(self):
        if self.data_file and self.dataset:
            yield "give either --data-file or --dataset, not both"
        if self.quiet and self.verbose:
            yield "give either --quiet or --verbose, not both"
        for component in self.target_components:
            reason = unscorable(component, self.include_embeddings)
            if reason:
                yield f"--target-components {component}: {reason}" + \
                    (" (add --include-embeddings)" if "embeddings" in reason else "")
        if self.stability_batches > self.max_samples and subsets_used(self):
            yield (f"--stability-batches {self.stability_batches} needs at least as many "
                   f"calibration blocks, but --max-samples is {self.max_samples}")
        for task in set(self.downstream_tasks) & set(self.lm_eval_tasks):
            yield (f"'{task}' is in both --downstream-tasks and --lm-eval-tasks: choose the "
                   f"built-in scorer or the harness for it")
        for task, source in self.task_data:
            if task not in self.downstream_tasks:
                yield f"--task-data names '{task}', which is not in --downstream-tasks"
            elif source != "hub" and not Path(source).expanduser().is_file():
                yield f"--task-data {task}: '{source}' does not exist or is not a file"
        if self.device_map:
            try:
                resolve_device_map(self.device_map)
            except UserError as error:
                yield str(error)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                yield "--device-map cannot be combined with torchrun data parallelism"
        if self.shard:
            yield from self._shard_problems()
        yield from self._folder_problems()
        if self.scores_from:
            meta = score_store.read_meta(score_store.locate(self.scores_from))
            if meta["metric"] != self.metric:
                yield (f"--scores-from holds {meta['metric']} scores but --metric is "
                       f"{self.metric}")

    def _shard_problems(self):
        if not METRICS[self.metric].shardable:
            why = METRICS[self.metric].unshardable_because
            why = f"({why})" if why else "yet"
            yield (f"--metric {self.metric} does not run under --shard {why}; use one of "
                   f"{', '.join(shardable_metrics())}")

    def _folder_problems(self):
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 alone writes the folder
            return
        if self.resume and self.overwrite:
            yield "give --resume or --overwrite, not both"
        problem = output.folder_problem(self.out_dir, replace=self.overwrite, resume=self.resume)
        if problem:
            yield problem
        elif self.resume:
            problem = resume.refusal(self.out_dir, self.to_dict(), type(self)().to_dict())
            if problem:
                yield problem


def settings_classes() -> list[type]:
    """Every settings class, each once: the metrics' and the perturbations' (registry order),
    then the analyses' (src/analysis/registry.py)."""
    declared = [entry.settings for entry in (*METRICS.values(), *PERTURBATIONS.values())]
    return list(dict.fromkeys([cls for cls in declared if cls is not None] +
                              registry.settings_classes() + [tracking.TrackingSettings]))
