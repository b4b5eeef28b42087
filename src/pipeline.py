"""run(config): one experiment, top to bottom. Each step is one plain function call.

Everything that can be wrong with the input (model, data, K, flags) is checked before the output
folder is touched, so a bad invocation never disturbs an existing run's files.
"""
from __future__ import annotations

import random
import traceback
from pathlib import Path

import numpy as np
import torch

from src.cli import RunConfig
from src.data.loading import prepare_data
from src.errors import UserError
from src.eval import downstream_step
from src.eval.perplexity import evaluate
from src.models.components import describe_parameters
from src.analysis import super_weights
from src.models.loader import load_model
from src.analysis.advanced_perturbations import eligible_restriction
from src.analysis.context import AnalysisContext
from src.analysis.steps import analysis_steps, print_lines
from src.sensitivity import experiment, stability
from src.sensitivity.metrics import (METRICS, ScoringJob, compute_scores, eligible_parameters,
                                     tied_parameter_names)
from src.sensitivity.perturb import PerturbOptions, resolve_bit
from src.sensitivity.rank import check_k, selection_table, top_k
from src.utils import distributed, manifest, report_console
from src.utils.io import update_json, write_csv, write_json, write_safetensors


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(config: RunConfig) -> dict:
    timer, started = manifest.StepTimer(), manifest.utc_now()
    seed_everything(config.seeds[0])
    quiet_libraries(config.verbose)
    data_parallel = distributed.from_environment(config.device, config.device_map)
    with timer.step("load_model"), distributed.main_first():  # rank 0 fills caches first
        model, tokenizer, model_info = load_model(
            config.model, dtype=config.dtype, device=distributed.device_for(config.device),
            device_map=config.device_map,
            cache_dir=config.cache_dir, revision=config.revision,
            trust_remote_code=config.trust_remote_code)
    if data_parallel is not None and not data_parallel.is_main:  # torchrun rank > 0
        return distributed.serve_scoring(model)  # scores rank 0's jobs, writes nothing
    model_info["hardware_after_load"] = manifest.hardware()
    model_info["data_parallel"] = vars(data_parallel) if data_parallel else None
    check_context(config, model_info)
    with timer.step("prepare_data"):
        data = prepare_data(tokenizer, data_file=config.data_file, dataset=config.dataset,
                            max_length=config.max_length, max_samples=config.max_samples)
    params = eligible_parameters(model, config.include_embeddings, *eligible_restriction(
        config.layers, config.target_layers, config.target_components, config.include_embeddings))
    check_k({n: p.numel() for n, p in params.items()}, config.topk, config.mode)
    if config.perturb == "bit_flip":
        for p in params.values():
            resolve_bit(config.bit_position, p.dtype)
    task_items = downstream_step.load_items(config.downstream_tasks, config.task_data,
                                            config.task_samples, config.seeds[0])
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config.to_dict())
    data_info = describe_data(data)
    state = {"success": False, "error": None}
    try:
        results = run_steps(config, model, params, data, out_dir, timer, model_info,
                            tokenizer=tokenizer, task_items=task_items)
        state["success"] = True
        return results
    except BaseException as error:
        state["error"] = f"{type(error).__name__}: {error}"
        if not isinstance(error, (UserError, KeyboardInterrupt)):
            state["traceback"] = traceback.format_exc()
        raise
    finally:
        record = manifest.build_manifest(
            config=config.to_dict(), model_info=model_info, data_info=data_info,
            seeds=config.seeds, timer=timer, out_dir=out_dir, success=state["success"],
            error=state["error"], started_at=started)
        write_json(out_dir / "experiment_manifest.json", record)


def run_steps(config, model, params, data, out_dir: Path, timer, model_info,
              tokenizer=None, task_items=None) -> dict:
    progress = config.verbose
    with timer.step("baseline_eval"):
        baseline = evaluate(model, data.evaluation, config.batch_size, progress)
    report_console.baseline(model_info, data, baseline)
    downstream = None
    if task_items:
        with timer.step("downstream_baseline"):
            downstream = downstream_step.DownstreamRecorder(model, tokenizer, task_items,
                                                            config.batch_size)

    job = ScoringJob(model=model, params=params, blocks=data.calibration,
                     data_parallel=distributed.current(),
                     batch_size=config.batch_size, seed=config.seeds[0],
                     hutchinson_samples=config.hutchinson_samples,
                     hutchinson_block=config.hutchinson_block, progress=progress)
    with timer.step(f"score_{config.metric}"):
        scored = compute_scores(job, config.metric)
    scores = scored.scores
    metas = describe_parameters(model, params)
    with timer.step("rank"):
        selection = top_k(scores, config.topk, config.mode)
    table = selection_table(selection, scores, params, metas, config.mode)
    if "stderr" in scored.extra:
        table["score_stderr"] = _gather_table(scored.extra["stderr"], table)
    write_json(out_dir / "sensitivity_stats.json",
               sensitivity_stats(scores, metas, config.metric, tied_parameter_names(model)))
    write_csv(out_dir / "top_weights.csv", table)
    if config.save_scores:
        tensors = dict(scores) | {f"{n}::stderr": s for n, s in scored.extra.get("stderr", {}).items()}
        write_safetensors(out_dir / "scores.safetensors", tensors,
                          {"metric": config.metric, "convention": "stored parameter layout"})
    report_console.top_weights(table, config.metric, scored.extra)
    results = {"baseline": baseline, "scores": scores, "selection": selection, "table": table}

    if config.perturb:
        options = PerturbOptions(scale=config.perturb_scale, bit=config.bit_position,
                                 prob=config.perturb_prob)
        conditions = experiment.build_conditions(selection, scores, config.topk, config.mode,
                                                 list(config.controls), list(config.seeds),
                                                 config.perturb, options)
        with timer.step("perturbation"):
            rows, restored = experiment.run_conditions(
                params, conditions, config.perturb, options,
                lambda: evaluate(model, data.evaluation, config.batch_size), baseline,
                on_condition=(lambda c: downstream.on_condition(c, config.perturb))
                if downstream else None)
        summary = experiment.summarize(rows, baseline.perplexity)
        perturbation = {"baseline": baseline.summary(), "method": config.perturb,
                        "k": config.topk, "mode": config.mode, "metric": config.metric,
                        "options": vars(options), "conditions": rows, "summary": summary,
                        "restore_verified": restored}
        write_json(out_dir / "perturbation_results.json", perturbation)
        report_console.perturbation(perturbation)
        results["perturbation"] = perturbation

    if downstream:
        write_json(out_dir / "downstream_results.json", downstream.results())
        downstream.print_summary()
        results["downstream"] = downstream.results()

    if config.stability_check:
        if not METRICS[config.metric].uses_data and config.metric != "random":
            print(f"[cwa] note: {config.metric} does not use data, so stability is trivially 1")
        with timer.step("stability"), stability.room_for_rescoring(scores):
            stab = stability.stability_check(job, config.metric, config.topk, config.mode,
                                             list(config.seeds), config.stability_fraction,
                                             config.stability_batches)
        write_json(out_dir / "stability_results.json", stab)
        report_console.stability(stab)
        results["stability"] = stab

    analyses = AnalysisContext(config, model, params, scores, selection, metas, job, data,
                               baseline, tokenizer)
    for key, analysis in analysis_steps(config):
        with timer.step(key):
            results[key] = analysis(analyses)
        update_json(out_dir / "enhanced_analysis.json", key, results[key])
        print_lines(key, results[key])

    if config.super_weights:
        with timer.step("super_weights"):
            found = super_weights.analyze(
                model, data.calibration, data.evaluation, config.batch_size,
                threshold=config.spike_threshold, max_weights=config.super_weight_max,
                seeds=config.seeds, baseline_ppl=baseline.perplexity, scores=scores,
                metric=config.metric, progress=progress)
        update_json(out_dir / "enhanced_analysis.json", "super_weights", found)
        super_weights.print_report(found)
        results["super_weights"] = found

    if config.save_plots:  # keep last: draws the outputs of every step above
        from src.utils import visualize  # matplotlib only when plotting

        with timer.step("plots"):
            results["plots"] = visualize.save_run_plots(
                out_dir, config.plot_formats, metric=config.metric, mode=config.mode,
                k=config.topk, scores=scores, metas=metas, table=table)
    return results


def quiet_libraries(verbose: bool) -> None:
    """Library progress bars and warnings only with --verbose; the tool prints its own steps."""
    import transformers

    if not verbose:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def check_context(config: RunConfig, model_info: dict) -> None:
    limit = model_info.get("max_context")
    if limit is not None and config.max_length > limit:
        raise UserError(f"--max-length {config.max_length} exceeds the model's context of "
                        f"{limit} tokens")


def describe_data(data) -> dict:
    return {"source": data.source, "n_documents": data.n_documents,
            "split": "documents at even positions -> evaluation, odd -> calibration",
            "calibration": {"documents": data.calibration_documents, "blocks": len(data.calibration),
                            "tokens": int(data.calibration.attention_mask.sum()),
                            "sha256": data.calibration.sha256()},
            "evaluation": {"documents": data.evaluation_documents, "blocks": len(data.evaluation),
                           "tokens": int(data.evaluation.attention_mask.sum()),
                           "sha256": data.evaluation.sha256()}}


QUANTILE_SAMPLE = 1_000_000


def sensitivity_stats(scores, metas, metric: str, tied: dict) -> dict:
    """Per scored parameter: layer, component, numel, mean, std, min, max, p50/p95/p99.

    Quantiles come from a fixed random sample of 1M entries on larger tensors.
    """
    per_param = {}
    generator = torch.Generator().manual_seed(0)
    for name, score in scores.items():
        flat = score.reshape(-1).float()
        sample = flat
        if flat.numel() > QUANTILE_SAMPLE:
            pick = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)
            sample = flat[pick.to(flat.device)]
        quantiles = torch.quantile(sample, torch.tensor([0.5, 0.95, 0.99], device=flat.device))
        numbers = torch.stack([flat.mean(), flat.std(), flat.min(), flat.max(), *quantiles]).cpu()
        mean, std, low, high, p50, p95, p99 = numbers.tolist()
        meta = metas[name]
        per_param[name] = {"layer": meta.layer, "component": meta.component,
                           "shape_out_in": list(meta.shape_out_in), "numel": flat.numel(),
                           "mean": mean, "std": std, "min": low, "max": high,
                           "p50": p50, "p95": p95, "p99": p99,
                           "quantiles_sampled": flat.numel() > QUANTILE_SAMPLE}
    return {"metric": metric, "signed": METRICS[metric].signed, "n_parameters": len(per_param),
            "n_weights": sum(v["numel"] for v in per_param.values()),
            "tied_parameters": tied, "parameters": per_param}


def _gather_table(extra_scores, table):
    values = []
    for name, group in table.groupby("parameter", sort=False):
        idx = torch.as_tensor(group["flat_index"].to_numpy())
        values.append((group.index, extra_scores[name].reshape(-1)[idx.to(extra_scores[name].device)].cpu().numpy()))
    column = np.empty(len(table))
    for index, vals in values:
        column[index] = vals
    return column
