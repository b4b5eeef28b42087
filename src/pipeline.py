"""run(config): one experiment, top to bottom, every part inside a timed step.

load model -> token blocks -> preflight (every check left that needs the model, before the output
folder is touched) -> baseline -> scores -> top-K -> perturbation conditions -> stability ->
analyses (src/analysis/registry.py) -> plots -> manifest.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from src.analysis import registry
from src.analysis.context import AnalysisContext, Preflight
from src.config import RunConfig
from src.data.loading import DataSplit, load_documents, prepare_data
from src.errors import UserError
from src.eval import downstream_step
from src.eval.perplexity import evaluate
from src.models.components import describe_parameters
from src.models.loader import load_model
from src.sensitivity import data_parallel, experiment, stability
from src.sensitivity.eligibility import (eligible_parameters, parse_layers, restriction,
                                         tied_parameter_names)
from src.sensitivity.metrics import METRICS, compute_scores
from src.sensitivity.perturb import PerturbOptions
from src.sensitivity.rank import selection_table, top_k
from src.sensitivity.scoring import ScoringJob
from src.sensitivity.statistics import tensor_statistics
from src.utils import manifest, output, report_console, signals
from src.utils.io import update_json, write_csv, write_json, write_safetensors

DEFAULT_METHOD = "zero"  # perturbation of the analyses' experiments when --perturb is not given


@dataclass
class Plan:
    """Everything loaded and checked before the output folder is touched."""
    model: torch.nn.Module
    tokenizer: object
    model_info: dict
    data: DataSplit
    params: dict[str, torch.nn.Parameter]
    task_items: dict
    analyses: list  # (Analysis, its settings, what its prepare() returned)


def run(config: RunConfig) -> dict:
    timer, started = manifest.StepTimer(), manifest.utc_now()
    with timer.step("setup"):
        seed_everything(config.seeds[0])
        quiet_libraries(config.verbose)
        group = data_parallel.from_environment(config.device)
        environment = manifest.environment()
    if group is not None and not group.is_main:  # torchrun rank > 0: scores rank 0's jobs
        model, _, _ = load(config, timer)
        return data_parallel.serve_scoring(model)
    with output.claim(config.out_dir, replace=config.overwrite) as out_dir:
        with timer.step("read_inputs"):  # text and task items first: fails fast when offline
            documents = load_documents(config.data_file, config.dataset)
            task_items = downstream_step.load_items(config.downstream_tasks, config.task_data,
                                                    config.task_samples, config.seeds[0])
        model, tokenizer, model_info = load(config, timer)
        with timer.step("prepare_data"):
            data = prepare_data(tokenizer, documents=documents, max_length=config.max_length,
                                max_samples=config.max_samples)
        with timer.step("preflight"):
            plan = preflight(config, model, tokenizer, model_info, data, task_items)
        with timer.step("start_output"):
            foreign = clear_output(config, out_dir)
            record = functools.partial(
                manifest.build_manifest, config=config.to_dict(), model_info=model_info,
                data_info=describe_data(data), seeds=config.seeds, timer=timer, out_dir=out_dir,
                started_at=started, environment=environment, data_parallel=group,
                foreign=foreign)
            write_json(out_dir / "config.json", config.to_dict())
            write_json(out_dir / output.MANIFEST, record(status="running"))
        status, error = "failed", None
        try:
            results = run_steps(config, plan, out_dir, timer)
            status = "succeeded"
            data_parallel.finish()  # torchrun: rank 0 releases the other ranks
            return results
        except (KeyboardInterrupt, signals.Interrupted) as stop:
            status, error = "interrupted", str(stop) or "interrupted by SIGINT (Ctrl-C)"
            raise
        except BaseException as failure:
            error = {"message": f"{type(failure).__name__}: {failure}"}
            if not isinstance(failure, UserError):
                error["traceback"] = traceback.format_exc()
            raise
        finally:
            write_json(out_dir / output.MANIFEST, record(status=status, error=error))


def load(config: RunConfig, timer):
    """(model, tokenizer, info) on this process's device; under torchrun rank 0 first."""
    with timer.step("load_model"), data_parallel.main_first():  # rank 0 fills caches first
        return load_model(config.model, dtype=config.dtype,
                          device=data_parallel.device_for(config.device),
                          device_map=config.device_map, cache_dir=config.cache_dir,
                          revision=config.revision, trust_remote_code=config.trust_remote_code)


def clear_output(config: RunConfig, out_dir: Path) -> frozenset[str]:
    """The run really starts: a replaced run's files go. Returns the files that stay (not this
    run's: its manifest never lists them)."""
    if config.overwrite:
        removed = output.remove_previous_run(out_dir)
        if removed:
            print(f"[cwa] --overwrite: removed the previous run's {', '.join(removed)}")
    return frozenset(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())


def preflight(config: RunConfig, model, tokenizer, model_info: dict, data: DataSplit,
              task_items: dict) -> Plan:
    """Every check that needs the model or the data, and every input an analysis prepares."""
    params = eligible_parameters(model, restriction(
        parse_layers(config.layers), parse_layers(config.target_layers),
        config.target_components, config.include_embeddings))
    config.check_loaded(context=model_info.get("max_context"),
                        sizes={n: p.numel() for n, p in params.items()},
                        dtypes=[p.dtype for p in params.values()],
                        n_calibration=len(data.calibration))
    checked = Preflight(model, tokenizer, params, data)
    analyses = [(analysis, settings, analysis.prepare(settings, checked) if analysis.prepare
                 else None) for analysis, settings in registry.enabled(config)]
    return Plan(model, tokenizer, model_info, data, params, task_items, analyses)


def run_steps(config: RunConfig, plan: Plan, out_dir: Path, timer) -> dict:
    model, data, params = plan.model, plan.data, plan.params
    with timer.step("baseline_eval"):
        baseline = evaluate(model, data.evaluation, config.batch_size, config.verbose)
        report_console.baseline(plan.model_info, data, baseline)
    downstream = None
    if plan.task_items:
        with timer.step("downstream_baseline"):
            downstream = downstream_step.DownstreamRecorder(model, plan.tokenizer,
                                                            plan.task_items, config.batch_size)
    job = ScoringJob(model=model, params=params, blocks=data.calibration,
                     data_parallel=data_parallel.current(), batch_size=config.batch_size,
                     seed=config.seeds[0], hutchinson_samples=config.hutchinson_samples,
                     hutchinson_block=config.hutchinson_block, progress=config.verbose)
    with timer.step(f"score_{config.metric}"):
        scored = compute_scores(job, config.metric)
    scores = scored.scores
    with timer.step("rank"):
        selection = top_k(scores, config.topk, config.mode)
    with timer.step("write_scores"):
        metas = describe_parameters(model, params)
        table = write_score_outputs(config, out_dir, model, scored, selection, params, metas)
    results = {"baseline": baseline, "scores": scores, "selection": selection, "table": table}
    options = PerturbOptions(scale=config.perturb_scale, bit=config.bit_position,
                             prob=config.perturb_prob)
    if config.perturb:
        with timer.step("perturbation"):
            results["perturbation"] = perturbation_step(config, params, selection, scores,
                                                        options, model, data, baseline,
                                                        downstream, out_dir)
    if downstream:
        with timer.step("downstream_results"):
            write_json(out_dir / "downstream_results.json", downstream.results(complete=True))
            downstream.print_summary()
            results["downstream"] = downstream.results(complete=True)
    if config.stability_check:
        with timer.step("stability"):
            results["stability"] = stability_step(config, job, scores, out_dir)
    shared = AnalysisContext(
        model=model, params=params, scores=scores, selection=selection, metas=metas, job=job,
        data=data, baseline=baseline, metric=config.metric, k=config.topk, mode=config.mode,
        seeds=config.seeds, controls=config.controls, method=config.perturb or DEFAULT_METHOD,
        options=options, batch_size=config.batch_size, progress=config.verbose,
        tokenizer=plan.tokenizer)
    for analysis, settings, prepared in plan.analyses:
        with timer.step(analysis.key):
            context = dataclasses.replace(shared, settings=settings, prepared=prepared)
            results[analysis.key] = analysis.run(context)
            update_json(out_dir / "enhanced_analysis.json", analysis.key, results[analysis.key])
            for line in analysis.summary(results[analysis.key]):
                print(f"[cwa] {line}")
    if config.save_plots:  # keep last: draws the outputs of every step above
        with timer.step("plots"):
            results["plots"] = plots_step(config, out_dir, scores, metas)
    return results


def write_score_outputs(config: RunConfig, out_dir: Path, model, scored, selection, params,
                        metas):
    """sensitivity_stats.json, top_weights.csv and (--save-scores) scores.safetensors."""
    scores = scored.scores
    table = selection_table(selection, scores, params, metas, config.mode)
    if "stderr" in scored.extra:
        table["score_stderr"] = _gather_table(scored.extra["stderr"], table)
    write_json(out_dir / "sensitivity_stats.json",
               sensitivity_stats(scores, metas, config.metric, tied_parameter_names(model)))
    write_csv(out_dir / "top_weights.csv", table)
    if config.save_scores:
        stderr = scored.extra.get("stderr", {})
        tensors = dict(scores) | {f"{n}::stderr": s for n, s in stderr.items()}
        write_safetensors(out_dir / "scores.safetensors", tensors,
                          {"metric": config.metric, "convention": "stored parameter layout"})
    report_console.top_weights(table, config.metric, scored.extra)
    return table


def perturbation_step(config: RunConfig, params, selection, scores, options, model, data,
                      baseline, downstream, out_dir: Path) -> dict:
    """Top-K and control conditions; results (and downstream results) saved after every
    condition with ``complete: false`` until the last, so an interrupted run keeps them."""
    conditions = experiment.build_conditions(selection, scores, config.topk, config.mode,
                                             list(config.controls), list(config.seeds),
                                             config.perturb, options)

    def save(rows: list[dict], complete: bool) -> dict:
        perturbation = {"baseline": baseline.summary(), "method": config.perturb,
                        "k": config.topk, "mode": config.mode, "metric": config.metric,
                        "options": vars(options), "complete": complete,
                        "n_conditions": len(conditions), "conditions": rows,
                        "summary": experiment.summarize(rows, baseline.perplexity),
                        "restore_verified": all(row["restore_verified"] for row in rows)}
        write_json(out_dir / "perturbation_results.json", perturbation)
        if downstream:
            write_json(out_dir / "downstream_results.json", downstream.results(complete))
        return perturbation

    finished: list[dict] = []
    try:
        experiment.run_conditions(
            params, conditions, config.perturb, options,
            lambda: evaluate(model, data.evaluation, config.batch_size), baseline,
            on_condition=(lambda c: downstream.on_condition(c, config.perturb)) if downstream
            else None, on_row=lambda rows: save(rows, complete=False), rows=finished)
    except (KeyboardInterrupt, signals.Interrupted):
        print(f"[cwa] interrupted: {len(finished)} of {len(conditions)} perturbation conditions "
              f"finished and are kept in perturbation_results.json (complete: false)",
              file=sys.stderr)
        raise
    perturbation = save(finished, complete=True)
    report_console.perturbation(perturbation)
    return perturbation


def stability_step(config: RunConfig, job: ScoringJob, scores, out_dir: Path) -> dict:
    if not METRICS[config.metric].uses_data and config.metric != "random":
        print(f"[cwa] note: {config.metric} does not use data, so stability is trivially 1")
    with stability.room_for_rescoring(scores):
        result = stability.stability_check(job, config.metric, config.topk, config.mode,
                                           list(config.seeds), config.stability_fraction,
                                           config.stability_batches)
    write_json(out_dir / "stability_results.json", result)
    report_console.stability(result)
    return result


def plots_step(config: RunConfig, out_dir: Path, scores, metas) -> list[str]:
    from src.report.run_folder import RunFolder  # matplotlib only when plotting
    from src.utils import run_plots, visualize

    folder = RunFolder.read(out_dir)
    folder.scores, folder.metas = scores, metas
    return visualize.save_run_plots(folder, {**run_plots.CORE_PLOTS, **registry.plots()},
                                    config.plot_formats)


# ----------------------------------------------------------------------------- helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_libraries(verbose: bool) -> None:
    """Library progress bars and warnings only with --verbose; the tool prints its own steps."""
    import transformers

    if not verbose:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def describe_data(data: DataSplit) -> dict:
    sides = {}
    for side, blocks, documents in (("calibration", data.calibration, data.calibration_documents),
                                    ("evaluation", data.evaluation, data.evaluation_documents)):
        sides[side] = {"documents": documents, "blocks": len(blocks),
                       "tokens": int(blocks.attention_mask.sum()), "sha256": blocks.sha256()}
    return {"source": data.source, "n_documents": data.n_documents,
            "split": "documents at even positions -> evaluation, odd -> calibration", **sides}


STATS_KEYS = ("mean", "std", "min", "max", "p50", "p95", "p99", "quantiles_sampled")


def sensitivity_stats(scores, metas, metric: str, tied: dict) -> dict:
    """Per scored parameter: layer, component, numel, mean, std, min, max, p50/p95/p99 of the
    signed score (quantiles from a fixed sample on large tensors)."""
    statistics = tensor_statistics(scores)
    per_param = {}
    for name, values in statistics.items():
        meta = metas[name]
        per_param[name] = {"layer": meta.layer, "component": meta.component,
                           "shape_out_in": list(meta.shape_out_in),
                           "numel": scores[name].numel(), **{k: values[k] for k in STATS_KEYS}}
    return {"metric": metric, "signed": METRICS[metric].signed, "n_parameters": len(per_param),
            "n_weights": sum(v["numel"] for v in per_param.values()),
            "tied_parameters": tied, "parameters": per_param}


def _gather_table(extra_scores, table):
    """One value per table row from per-parameter tensors (e.g. Hutchinson standard errors)."""
    column = np.empty(len(table))
    for name, group in table.groupby("parameter", sort=False):
        idx = torch.as_tensor(group["flat_index"].to_numpy())
        tensor = extra_scores[name].reshape(-1)
        column[group.index] = tensor[idx.to(tensor.device)].cpu().numpy()
    return column
