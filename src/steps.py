"""The steps of a run that produce its results, each writing its file(s) in --out-dir.

Each takes the ``RunState``: what the run holds once the weights are scored and ranked.
Experiments save their results after every condition, with ``complete: false`` until the last,
so an interrupted run keeps the conditions that finished.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from src.config import RunConfig
from src.data.loading import DataSplit
from src.distributed.ranks import Ranks
from src.eval.perplexity import EvalResult, evaluate
from src.sensitivity import compression, experiment, quantize, stability
from src.sensitivity.eligibility import tied_parameter_names
from src.sensitivity.metrics import METRICS
from src.sensitivity.perturb import PerturbOptions, changed_by
from src.sensitivity.rank import Selection, selection_table
from src.sensitivity.scoring import MetricOutput, ScoringJob
from src.sensitivity.statistics import tensor_statistics
from src.utils import progress, report_console, signals
from src.utils.format import fixed
from src.utils.io import write_csv, write_json



@dataclass
class RunState:
    config: RunConfig
    out_dir: Path
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    metas: dict
    data: DataSplit
    baseline: EvalResult
    job: ScoringJob
    scored: MetricOutput
    selection: Selection
    downstream: object = None   # DownstreamRecorder when downstream tasks run
    options: PerturbOptions = field(default_factory=PerturbOptions)
    previous: object = None     # resume.Previous: what an unfinished run left (--resume)
    kept: dict = field(default_factory=dict)  # what --resume kept, for the manifest
    layout: object = None       # sharding.Layout under --shard

    @property
    def scores(self):
        return self.scored.scores

    def evaluate(self) -> EvalResult:
        return evaluate(self.model, self.data.evaluation, self.config.batch_size,
                        ranks=self.job.ranks)


def scoring_job(config: RunConfig, model, params, blocks, ranks: Ranks) -> ScoringJob:
    """The run's ScoringJob on ``blocks``: batch size, first seed, progress mode and every
    metric's settings from ``config``; ``ranks``: the processes that share its batches."""
    settings = {metric.settings: config.settings(metric.settings) for metric in METRICS.values()
                if metric.settings is not None}
    return ScoringJob(model=model, params=params, blocks=blocks, batch_size=config.batch_size,
                      seed=config.seeds[0], settings=settings,
                      progress=progress.mode(config.quiet, config.verbose), ranks=ranks,
                      topk=config.topk, gradient_checkpointing=config.gradient_checkpointing)


def score_outputs(state: RunState):
    """sensitivity_stats.json and top_weights.csv (the scores themselves are saved as soon as
    they are computed: src/sensitivity/score_store.py)."""
    config, out_dir, scored, metas = state.config, state.out_dir, state.scored, state.metas
    scores, selection, params, model = scored.scores, state.selection, state.params, state.model
    table = selection_table(selection, scores, params, metas, config.mode, state.layout)
    if "stderr" in scored.extra:
        table["score_stderr"] = _gather_table(scored.extra["stderr"], table, state.layout)
    write_json(out_dir / "sensitivity_stats.json",
               sensitivity_stats(scores, metas, config.metric, tied_parameter_names(model),
                                 state.layout))
    write_csv(out_dir / "top_weights.csv", table)
    report_console.top_weights(table, config.metric, scored.extra)
    return table


def perturbation(state: RunState) -> dict:
    """Top-K and control conditions (perturbation_results.json, perturbation_blocks.csv)."""
    config, options, baseline = state.config, state.options, state.baseline
    conditions = experiment.build_conditions(
        state.selection, state.scores, config.topk, config.mode, list(config.controls),
        list(config.seeds), config.perturb, options, layout=state.layout,
        eligible=changed_by(config.perturb, options, state.params))
    kept, blocks = resumed_rows(state, "perturbation", conditions, config.perturb)
    resolution = experiment.perplexity_resolution(baseline)

    def save(rows: list[dict], complete: bool) -> dict:
        perturbation = {"baseline": baseline.summary(), "method": config.perturb,
                        "k": config.topk, "mode": config.mode, "metric": config.metric,
                        "options": options.recorded(), "complete": complete,
                        "n_conditions": len(conditions), "conditions": rows,
                        "summary": experiment.summarize(rows, baseline.perplexity, resolution),
                        "bootstrap": {**experiment.BOOTSTRAP,
                                      "blocks_file": experiment.BLOCK_FILES["perturbation"]},
                        "restore_verified": all(row["restore_verified"] for row in rows)}
        save_blocks(state, "perturbation", rows, blocks)
        write_json(state.out_dir / "perturbation_results.json", perturbation)
        save_downstream(state)
        return perturbation

    rows = run_saving(state, conditions, "perturbation_results.json", save, config.perturb,
                      kept=kept, blocks=blocks)
    perturbation = save(rows, complete=True)
    report_console.perturbation(perturbation)
    return perturbation


def quantization(state: RunState) -> dict:
    """The compression experiment (src/sensitivity/compression.py; quantization_results.json,
    quantization_blocks.csv)."""
    config, baseline, params, selection = state.config, state.baseline, state.params, \
        state.selection
    spec = quant_spec(config)
    groups = quantize.row_groups(state.metas, spec)
    report_console.quantization_groups(groups, spec.group)
    changes = quantize.changed_by(params, state.metas, spec)
    conditions = compression.build_conditions(selection, state.scores, config.topk, config.mode,
                                              config.controls, config.seeds, changes,
                                              state.layout)
    n_eligible = sum(p.numel() for p in params.values())
    kept, blocks = resumed_rows(state, "quantization", conditions, spec.label)

    def save(rows: list[dict], complete: bool) -> dict:
        rows = compression.with_recovery(rows, baseline.perplexity)
        results = {"baseline": baseline.summary(), "quantization": {**vars(spec),
                                                                    "label": spec.label},
                   "groups": groups, "k": config.topk, "mode": config.mode,
                   "metric": config.metric,
                   "share_kept": compression.share_kept(selection, n_eligible),
                   "complete": complete, "n_conditions": len(conditions), "conditions": rows,
                   "summary": compression.summarize(rows),
                   "bootstrap": {**experiment.BOOTSTRAP,
                                 "blocks_file": experiment.BLOCK_FILES["quantization"]},
                   "restore_verified": all(row["restore_verified"] for row in rows)}
        save_blocks(state, "quantization", rows, blocks)
        write_json(state.out_dir / "quantization_results.json", results)
        save_downstream(state)
        return results

    originals = quantize.backup(params)
    rows = run_saving(state, conditions, "quantization_results.json", save, spec.label,
                      apply=lambda c: quantize.quantized(params, state.metas, spec, c.selection,
                                                         originals, state.layout),
                      changed=lambda c, checked: compression.count_changed(changes, params, c,
                                                                           checked),
                      kept=kept, blocks=blocks)
    results = save(rows, complete=True)
    report_console.quantization(results)
    return results


def save_blocks(state: RunState, experiment_name: str, rows: list[dict], blocks: list) -> None:
    """The per-block NLL sums behind each row's bootstrap interval (``selection``: the kept set
    for the compression experiment)."""
    frame = experiment.block_frame(state.baseline, [{"selection": r.get("kept", r.get(
        "selection")), "seed": r["seed"]} for r in rows], blocks)
    write_csv(state.out_dir / experiment.BLOCK_FILES[experiment_name], frame)


def quant_spec(config: RunConfig) -> quantize.QuantSpec:
    return quantize.QuantSpec(config.quantize, config.quant_group,
                              "symmetric" if config.quant_symmetric else "asymmetric")


def resumed_rows(state: RunState, experiment_name: str, conditions,
                 method: str) -> tuple[list[dict], list]:
    """With --resume, the rows the unfinished run finished for these conditions (in the same
    order, so the rest can run) and their evaluation blocks; ([], []) otherwise."""
    if state.previous is None:
        return [], []
    rows = getattr(state.previous, f"{experiment_name}_rows")
    if experiment_name == "quantization":
        rows = compression.raw_rows(rows)
    rows = rows[:len(conditions)]
    same = all((row["selection"], row["seed"]) == (c.selection_name, c.seed)
               for row, c in zip(rows, conditions))
    rows = rows if same else []
    frame = state.previous.blocks.get(experiment_name)  # read by rank 0, given to every rank
    blocks = experiment.blocks_from_frame(frame, len(rows)) if frame is not None else []
    rows = rows[:len(blocks)]  # a condition is kept with the blocks its interval came from
    if state.downstream:  # a kept condition needs its task results too
        rows = rows[:state.downstream.keep(rows, method)]
    state.kept[f"{experiment_name}_conditions"] = len(rows)
    if len(rows) < len(conditions):
        state.kept.setdefault("resumed_at_step", f"{experiment_name} condition {len(rows) + 1} "
                                                 f"of {len(conditions)}")
    return rows, blocks[:len(rows)]


def run_saving(state: RunState, conditions, file_name: str, save, method: str, apply=None,
               changed=None, kept: list[dict] | None = None,
               blocks: list | None = None) -> list[dict]:
    """The conditions of an experiment after the ``kept`` ones, ``save(rows, complete=False)``
    after each; on an interruption the console says how many finished."""
    finished: list[dict] = list(kept or [])
    downstream = state.downstream
    if finished:
        print(f"[cwa] --resume: {len(finished)} of {len(conditions)} conditions of "
              f"{file_name} were finished and are kept")
    try:
        experiment.run_conditions(
            state.params, conditions[len(finished):], method, state.options, state.evaluate,
            state.baseline,
            on_condition=(lambda c: downstream.on_condition(c, method)) if downstream else None,
            on_row=lambda rows: (save(rows, complete=False),
                                 report_progress(state, rows, len(conditions))),
            rows=finished, apply=apply,
            layout=state.layout, changed=changed, blocks=blocks)
    except (KeyboardInterrupt, signals.Interrupted):
        print(f"[cwa] interrupted: {len(finished)} of {len(conditions)} conditions finished and "
              f"are kept in {file_name} (complete: false)", file=sys.stderr)
        raise
    return finished


def report_progress(state: RunState, rows: list[dict], n_conditions: int) -> None:
    """In a log (progress mode ``lines``): one line for the condition that just finished."""
    if state.job.progress != "lines":
        return
    row = rows[-1]
    seed = "" if row["seed"] is None else f" seed {row['seed']}"
    progress.line(f"condition {len(rows)}/{n_conditions} {row['selection']}{seed}: perplexity "
                  f"{fixed(row['perplexity'])}, {row['n_changed']} weights changed, "
                  f"{row['seconds']:.1f} s")


def save_downstream(state: RunState, complete: bool = False) -> None:
    if state.downstream:
        write_json(state.out_dir / "downstream_results.json",
                   state.downstream.results(complete=complete))


def stability_check(state: RunState) -> dict:
    config, job, scores, out_dir = state.config, state.job, state.scores, state.out_dir
    if state.previous is not None and state.previous.stability is not None:
        state.kept["stability"] = True  # --resume: the unfinished run finished this step
        report_console.stability(state.previous.stability)
        return state.previous.stability
    if not METRICS[config.metric].uses_data and config.metric != "random":
        print(f"[cwa] note: {config.metric} does not use data, so stability is trivially 1")
    with stability.room_for_rescoring(scores):
        result = stability.stability_check(job, config.metric, config.topk, config.mode,
                                           list(config.seeds), config.stability_fraction,
                                           config.stability_batches, main_scores=scores,
                                           layout=state.layout)
    write_json(out_dir / "stability_results.json", result)
    report_console.stability(result)
    return result


def plots(state: RunState, extra_plots: dict) -> list[str]:
    """Every plot whose input exists (core ones and ``extra_plots``) into plots/; under --shard
    every rank adds its part of the score summary and rank 0 draws."""
    from src.report.run_folder import RunFolder  # matplotlib only when plotting
    from src.report import experiment_plots, plotting, run_plots  # noqa: F401 - register plots

    summary = run_plots.summarize(state.scores, state.layout) if state.scores else None
    if not state.job.ranks.is_main:
        return []
    folder = RunFolder.read(state.out_dir)
    folder.score_summary, folder.metas = summary, state.metas
    return plotting.save_run_plots(folder, {**plotting.RUN_PLOTS, **extra_plots},
                                    state.config.plot_formats)


STATS_KEYS = ("mean", "std", "min", "max", "p50", "p95", "p99", "quantiles_sampled")


def sensitivity_stats(scores, metas, metric: str, tied: dict, layout=None) -> dict:
    """Per scored parameter: layer, component, numel, mean, std, min, max, p50/p95/p99 of the
    signed score (quantiles from a fixed sample on large tensors). ``layout``: sharded scores."""
    statistics = tensor_statistics(scores, layout=layout)
    per_param = {}
    for name, values in statistics.items():
        meta = metas[name]
        numel = layout.numel[name] if layout is not None else scores[name].numel()
        per_param[name] = {"layer": meta.layer, "component": meta.component,
                           "shape_out_in": list(meta.shape_out_in),
                           "numel": numel, **{k: values[k] for k in STATS_KEYS}}
    return {"metric": metric, "signed": METRICS[metric].signed, "n_parameters": len(per_param),
            "n_weights": sum(v["numel"] for v in per_param.values()),
            "tied_parameters": tied, "parameters": per_param}


def _gather_table(extra_scores, table, layout):
    """One value per table row from per-parameter tensors (e.g. Hutchinson standard errors);
    ``layout``: the tensors are sharded (a collective: every rank has the same table)."""
    groups = list(table.groupby("parameter", sort=False))
    requests = {name: (extra_scores[name], torch.tensor(group["flat_index"].to_numpy(),
                                                        dtype=torch.long))
                for name, group in groups}
    if layout is not None:
        values = layout.values_at(requests)
    else:
        values = {name: tensor.reshape(-1)[idx.to(tensor.device)].cpu()
                  for name, (tensor, idx) in requests.items()}
    column = np.empty(len(table))
    for name, group in groups:
        column[group.index] = values[name].double().numpy()
    return column
