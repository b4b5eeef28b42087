"""run(config): one experiment, top to bottom, every part inside a timed step.

load model -> token blocks -> preflight (every check left that needs the model, before the output
folder is touched) -> baseline -> scores -> top-K -> perturbation conditions -> stability ->
analyses (src/analysis/registry.py) -> plots -> manifest.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from src.analysis import registry
from src.analysis.context import AnalysisContext, Preflight
from src.config import RunConfig
from src.data.loading import DataSplit, load_documents, prepare_data
from src.errors import UserError
from src.eval import downstream_step, harness
from src.eval.perplexity import evaluate
from src.models.components import describe_parameters
from src.models.loader import load_model
from src.report import tracking
from src.distributed import ranks as distributed, sharding
from src.sensitivity import quantize, score_store
from src.sensitivity.eligibility import (eligible_parameters, parse_layers, restriction)
from src.sensitivity.metrics import compute_scores
from src.sensitivity.perturb import PerturbOptions
from src.sensitivity.rank import top_k
from src.sensitivity.scoring import ScoringJob
from src import loaded_checks, resume, steps
from src.utils import manifest, output, report_console, signals
from src.utils.io import update_json, write_json

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
    harness_tasks: object  # src.eval.harness.HarnessTasks when --lm-eval-tasks, else None
    analyses: list  # (Analysis, its settings, what its prepare() returned)
    job: ScoringJob
    previous: object = None       # resume.Previous with --resume
    stored_scores: Path | None = None
    cache: dict = field(default_factory=dict)  # results the analyses of this run share
    record: dict = field(default_factory=dict)  # extra manifest sections
    layout: object = None  # sharding.Layout under --shard: where each weight's rows live
    state_kept: dict = field(default_factory=dict)  # what --resume kept


def run(config: RunConfig) -> dict:
    if int(os.environ.get("RANK", "0")) != 0:
        # torchrun: every rank runs every step on its share; rank 0 alone writes the real folder
        # and the console, the others a scratch folder that goes when they finish
        with tempfile.TemporaryDirectory(prefix="cwa_shard_rank") as scratch, \
                open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return run_steps_of(replace(config, out_dir=str(Path(scratch) / "run"),
                                        overwrite=False))
    results = run_steps_of(config)
    tracked = config.settings(tracking.TrackingSettings)
    if tracked.report_to != "none":
        out_dir = Path(config.out_dir)
        where = tracking.report(
            tracked.report_to, out_dir, experiment=tracked.tracking_experiment,
            location=tracked.tracking_uri or tracking.default_location(tracked.report_to,
                                                                       out_dir.parent),
            run_name=out_dir.name)
        print(f"[cwa] tracked: {where}", file=sys.stderr)
    return results


def run_steps_of(config: RunConfig) -> dict:
    timer, started = manifest.StepTimer(), manifest.utc_now()
    with timer.step("setup"):
        seed_everything(config.seeds[0])
        quiet_libraries(config.verbose)
        ranks = distributed.join(config.device, shard=config.shard)
        environment = manifest.environment()
    with output.claim(config.out_dir, replace=config.overwrite, resume=config.resume) as out_dir:
        with timer.step("read_inputs"):  # text and task items first: fails fast when offline
            documents = load_documents(config.data_file, config.dataset)
            task_items = downstream_step.load_items(config.downstream_tasks, config.task_data,
                                                    config.task_samples, config.seeds[0])
            harness_tasks = harness.load_tasks(
                config.lm_eval_tasks, config.lm_eval_include, config.lm_eval_fewshot,
                config.lm_eval_limit, config.lm_eval_batch_size or config.batch_size,
                config.verbose) if config.lm_eval_tasks else None
        model, tokenizer, model_info = load(config, timer, ranks)
        with timer.step("prepare_data"):
            data = prepare_data(tokenizer, documents=documents, max_length=config.max_length,
                                max_samples=config.max_samples)
        with timer.step("preflight"):
            previous = resume.read_previous(out_dir) if config.resume else None
            if config.resume:  # the other ranks write a scratch folder
                previous = ranks.main_value(previous)
            plan = preflight(config, ranks, model, tokenizer, model_info, data, task_items,
                             harness_tasks, previous)
        with timer.step("start_output"):
            if ranks.is_main:
                for warning in plan.record["warnings"]:
                    print(f"[cwa] warning: {warning}", file=sys.stderr)
            foreign = clear_output(config, out_dir)
            record = functools.partial(
                manifest.build_manifest, config=config.to_dict(), model_info=model_info,
                data_info=describe_data(data), seeds=config.seeds, timer=timer, out_dir=out_dir,
                started_at=started, environment=environment, data_parallel=ranks.describe(),
                foreign=foreign, extra=plan.record)
            plan.record["lm_eval"] = harness_tasks.info if harness_tasks else None
            write_json(out_dir / "config.json", config.to_dict())
            write_json(out_dir / output.MANIFEST, record(status="running"))
        status, error = "failed", None
        try:
            results = run_steps(config, plan, out_dir, timer)
            status = "succeeded"
            distributed.leave()
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


def load(config: RunConfig, timer, ranks):
    """(model, tokenizer, info) on this process's device (sharded with --shard); under torchrun
    rank 0 first, so it fills the caches alone (with --shard only rank 0 reads a checkpoint,
    and every rank loads at once: the shards come from rank 0 by broadcast)."""
    in_turn = contextlib.nullcontext() if ranks.sharded else distributed.main_first()
    with timer.step("load_model"), in_turn:
        return load_model(config.model, dtype=config.dtype,
                          device=distributed.device_for(config.device),
                          device_map=config.device_map, cache_dir=config.cache_dir,
                          revision=config.revision, trust_remote_code=config.trust_remote_code,
                          shard_over=ranks if ranks.sharded else None)


def clear_output(config: RunConfig, out_dir: Path) -> frozenset[str]:
    """The run really starts: a replaced run's files go. Returns the files that are not this
    run's (its manifest never lists them): what stays after a replace; with --resume, what is
    neither a run file nor listed by the run's manifest."""
    if config.overwrite:
        removed = output.remove_previous_run(out_dir)
        if removed:
            print(f"[cwa] --overwrite: removed the previous run's {', '.join(removed)}")
    present = {str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()}
    if config.resume:
        present -= set(output.RUN_FILES) | output.listed_files(out_dir)
        present = {name for name in present if not name.startswith("plots/")}
    return frozenset(present)


def preflight(config: RunConfig, ranks, model, tokenizer, model_info: dict, data: DataSplit,
              task_items: dict, harness_tasks, previous) -> Plan:
    """Every check that needs the model or the data (stored scores that must fit included),
    and every input an analysis prepares."""
    params = eligible_parameters(model, restriction(
        parse_layers(config.layers), parse_layers(config.target_layers),
        config.target_components, config.include_embeddings))
    loaded_checks.check_model(config, context=model_info.get("max_context"),
                              sizes={n: p.numel() for n, p in params.items()},
                              dtypes=[p.dtype for p in params.values()],
                              n_calibration=len(data.calibration))
    checked = Preflight(model, tokenizer, params, data)
    analyses = [(analysis, settings, analysis.prepare(settings, checked) if analysis.prepare
                 else None) for analysis, settings in registry.enabled(config)]
    job = steps.scoring_job(config, model, params, data.calibration, ranks=ranks)
    plan = Plan(model, tokenizer, model_info, data, params, task_items, harness_tasks, analyses,
                job, previous=previous,
                layout=sharding.Layout.of(params, ranks) if ranks.sharded else None)
    plan.record["warnings"] = loaded_checks.data_warnings(config, data)
    if ranks.sharded:
        plan.record["sharding"] = sharding.describe(ranks, model)
        problem = config.quantize and quantize.shard_problem(
            params, describe_parameters(model, params), steps.quant_spec(config))
        if problem:
            raise UserError(problem)
    plan.stored_scores = stored_scores_for(config, plan)
    return plan


def stored_scores_for(config: RunConfig, plan: Plan) -> Path | None:
    """The scores file this run uses instead of scoring: --scores-from (it must fit: exit 2
    otherwise), or with --resume the run's own when they fit; None: score."""
    source = score_store.locate(config.scores_from) if config.scores_from else None
    if plan.previous is not None and plan.previous.scores is not None:
        source = plan.previous.scores
    if source is None:
        return None
    if not plan.job.ranks.all_true(source.is_file()):
        raise UserError(f"torchrun: every process reads {source}, and some cannot see it; put "
                        f"it on a filesystem every node shares")
    meta = score_store.read_meta(source)
    why = score_store.mismatch(meta, config.metric, plan.job,
                               score_store.model_fingerprint(plan.model))
    differences = score_store.calibration_differences(meta, calibration_of(config, plan.data))
    if plan.previous is not None and source == plan.previous.scores:
        why = why or ("they were computed on other calibration data" if differences else None)
        if why:
            print(f"[cwa] --resume: the saved scores do not fit ({why}); scoring again")
            return None
    if why:
        raise UserError(f"--scores-from '{config.scores_from}' does not fit this run: {why}")
    described, warning = loaded_checks.scores_data(config, differences)
    if warning:
        plan.record["warnings"].append(warning)
    plan.record["scores_source"] = {"path": str(source), "metric": meta["metric"],
                                    "calibration": score_store.stored_calibration(meta),
                                    "same_calibration_as_this_run": not differences,
                                    "differences": described}
    return source


def calibration_of(config: RunConfig, data: DataSplit) -> dict:
    return score_store.calibration_of(data, config.max_length, config.max_samples)


def run_steps(config: RunConfig, plan: Plan, out_dir: Path, timer) -> dict:
    model, data, params = plan.model, plan.data, plan.params
    with timer.step("baseline_eval"):
        baseline = evaluate(model, data.evaluation, config.batch_size, plan.job.progress == "bars",
                            ranks=plan.job.ranks)
        report_console.baseline(plan.model_info, data, baseline)
    downstream = None
    if plan.task_items or plan.harness_tasks:
        with timer.step("downstream_baseline"):
            downstream = downstream_step.DownstreamRecorder(
                model, plan.tokenizer, plan.task_items, config.batch_size, plan.harness_tasks,
                previous=plan.previous.downstream if plan.previous else None)
            if downstream.resumed:
                plan.state_kept["downstream_baseline"] = True
    job = plan.job
    scored = score_or_load(config, plan, out_dir, timer)
    if scored.facts:
        plan.record["score_facts"] = {"metric": config.metric, **scored.facts}
        report_console.score_facts(config.metric, scored.facts)
    with timer.step("rank"):
        selection = top_k(scored.scores, config.topk, config.mode, layout=plan.layout)
    state = steps.RunState(
        config, out_dir, model, params, describe_parameters(model, params), data, baseline, job,
        scored, selection, downstream, config.settings(PerturbOptions),
        previous=plan.previous, kept=plan.state_kept, layout=plan.layout)
    with timer.step("write_scores"):
        table = steps.score_outputs(state)
    results = {"baseline": baseline, "scores": scored.scores, "selection": selection,
               "table": table}
    for wanted, name, step in ((config.perturb, "perturbation", steps.perturbation),
                               (config.quantize, "quantization", steps.quantization),
                               (config.stability_check, "stability", steps.stability_check)):
        if wanted:
            with timer.step(name):
                results[name] = step(state)
    if downstream:
        with timer.step("downstream_results"):
            steps.save_downstream(state, complete=True)
            downstream.print_summary()
    for analysis, settings, prepared in plan.analyses:
        kept = (plan.previous.analyses if plan.previous else {}).get(analysis.key)
        if kept is not None:  # --resume: a finished section stays
            state.kept.setdefault("analyses", []).append(analysis.key)
            results[analysis.key] = kept
            continue
        with timer.step(analysis.key):
            results[analysis.key] = run_analysis(state, plan, analysis, settings, prepared)
        plan.cache[("section", analysis.key)] = results[analysis.key]  # for later analyses
    if plan.previous is not None:
        plan.record["resumed"] = resume.record(plan.previous, state.kept)
    if config.save_plots:  # keep last: draws the outputs of every step above
        with timer.step("plots"):
            results["plots"] = steps.plots(state, registry.plots())
    if not config.save_scores:  # the resume state goes once the run has succeeded
        (out_dir / score_store.FILE_NAME).unlink(missing_ok=True)
    return results


def score_or_load(config: RunConfig, plan: Plan, out_dir: Path, timer):
    """The run's scores: loaded (--scores-from, or --resume after scoring), else computed and
    saved at once, so a killed run can resume after its scoring."""
    if plan.stored_scores is not None:
        with timer.step("load_scores"):
            stored = score_store.load(plan.stored_scores, plan.params)
        plan.record["scores_source"]["sha256"] = stored.sha256
        if plan.previous is not None:
            plan.state_kept["scoring_seconds"] = stored.meta.get("scoring_seconds", 0.0)
            plan.state_kept["scores"] = True
        print(f"[cwa] scores loaded from {stored.path} (scoring skipped; it took "
              f"{stored.meta.get('scoring_seconds', '?')} s)")
        own = out_dir / score_store.FILE_NAME
        rewrite = config.save_scores and stored.path.resolve() != own.resolve()
        rewrite = plan.job.ranks.main_value(rewrite)  # sharded, saving is a collective
        if rewrite:
            score_store.save(own, stored.output, stored.meta, plan.job.ranks, plan.layout)
        return stored.output
    with timer.step(f"score_{config.metric}"):
        start = time.perf_counter()
        scored = compute_scores(plan.job, config.metric)
        seconds = time.perf_counter() - start
    keep = config.save_scores or worth_keeping_for_resume(scored, seconds, plan.layout)
    keep = plan.job.ranks.main_value(keep)
    if not keep:
        print(f"[cwa] scores not written for --resume: computing them took {seconds:.1f} s, "
              f"less than writing them would (--save-scores writes them anyway)")
        return scored
    with timer.step("save_scores"):
        score_store.save(out_dir / score_store.FILE_NAME, scored, score_store.describe(
            config.metric, plan.job, score_store.model_fingerprint(plan.model),
            calibration_of(config, plan.data), seconds, scored.facts), plan.job.ranks,
            plan.layout)
    return scored


# The GPU machine wrote llama-3.1-8b's 30 GB of float32 scores in 92 s (~330 MB/s), 30 times
# longer than grad_x_weight took to compute them on 50 blocks.
SCORE_WRITE_BYTES_PER_SECOND = 300e6
ALWAYS_KEPT_BYTES = 2**30  # written in a few seconds at most


def worth_keeping_for_resume(scored, scoring_seconds: float, layout=None) -> bool:
    """Whether the resume state should hold these scores: always when they are small, else only
    when recomputing them on a resume would take longer than writing them (the whole file, also
    when ``layout`` says they are this rank's shards)."""
    named = [*scored.scores.items(), *(item for extra in scored.extra.values()
                                       for item in extra.items())]
    n_bytes = sum((layout.numel[name] if layout else t.numel()) * t.element_size()
                  for name, t in named)
    return n_bytes <= ALWAYS_KEPT_BYTES or \
        scoring_seconds > n_bytes / SCORE_WRITE_BYTES_PER_SECOND


def run_analysis(state: steps.RunState, plan: Plan, analysis, settings, prepared) -> dict:
    """One registered analysis: its section of enhanced_analysis.json and console lines."""
    config = state.config
    context = AnalysisContext(
        model=state.model, params=state.params, scored=state.scored, selection=state.selection,
        metas=state.metas, job=state.job, data=state.data, baseline=state.baseline,
        metric=config.metric, k=config.topk, mode=config.mode, seeds=config.seeds,
        controls=config.controls, method=config.perturb or DEFAULT_METHOD, options=state.options,
        batch_size=config.batch_size, progress=state.job.progress == "bars",
        tokenizer=plan.tokenizer,
        settings=settings, prepared=prepared, cache=plan.cache, layout=state.layout)
    section = analysis.run(context)
    update_json(state.out_dir / "enhanced_analysis.json", analysis.key, section)
    if analysis.files is not None:
        analysis.files(section, state.out_dir)
    for line in analysis.summary(section):
        print(f"[cwa] {line}")
    return section


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
