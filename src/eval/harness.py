"""Any lm-evaluation-harness task, scored by the harness itself on the model in memory.

``load_tasks`` (before the run: names checked, data loaded, few-shot set) and ``evaluate`` (the
baseline, then inside every perturbation condition). The harness's ``HFLM`` wraps the model
object the run holds (no reload, no copy: the same dtype and device), so a perturbed model is
scored as it is. Each task (or group) is evaluated on its own, so a condition shows one
progress step per task.

Metrics keep the harness's names without the filter suffix (``acc``, ``acc_norm``,
``perplexity``, ``exact_match`` ...; ``metric,filter`` where one metric has several filters),
standard errors as ``<metric>_stderr``, and ``n`` = the samples scored.

Offline: with the hub unreachable, task data comes from the local datasets cache only; a task
whose data is not there fails before the run with one line, pointing to ``--lm-eval-include``
(a folder of task YAML files over local data, like src/data/harness_tasks).

The harness is imported only when a run asks for it (it adds about a second of imports and
several seconds of task indexing).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import io
import json
import logging
import os
from dataclasses import dataclass, field

from src.errors import UserError
from src.utils import hub

BOOTSTRAP_ITERS = 1000  # resamples behind the harness's bootstrapped standard errors
BUNDLED_TASKS = "src/data/harness_tasks"


@dataclass
class HarnessTasks:
    """The loaded tasks of a run: name as asked -> the harness's TaskDict of it."""
    loaded: dict
    limit: int | None
    batch_size: int
    progress: bool
    info: dict = field(default_factory=dict)  # harness and task versions, config hashes
    _lm: object = None


def load_tasks(names, include: str | None, fewshot: int | None, limit: int | None,
               batch_size: int, verbose: bool) -> HarnessTasks:
    """Every named task or group, with its data; UserError (one line) when a name is unknown
    or its data cannot be had (offline and not cached)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _quiet(verbose)
    manager = TaskManager(include_path=include) if include else TaskManager()
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=4)
            raise UserError(f"unknown lm-eval task '{name}'"
                            + (f"; close matches: {', '.join(close)}" if close else "")
                            + (f" (tasks of --lm-eval-include {include} included)"
                               if include else ""))
    online = hub.hub_reachable()
    loaded = {name: _load_one(manager, name, online) for name in names}
    for task_dict in loaded.values():
        for task in task_dict["tasks"].values():
            _set_fewshot(task, fewshot)
    info = {"version": lm_eval.__version__, "fewshot": fewshot, "limit": limit,
            "include": include, "tasks": _task_info(loaded)}
    return HarnessTasks(loaded, limit, batch_size, verbose, info)


def _load_one(manager, name: str, online: bool) -> dict:
    try:
        if online:
            return manager.load([name])
        with hub.cache_only():
            return manager.load([name])
    except Exception as error:  # noqa: BLE001 - whatever the harness raises is one line here
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        where = ("the hub is unreachable (offline) and its data is not in the local cache"
                 if not online else f"its data could not be loaded ({reason})")
        raise UserError(f"lm-eval task '{name}': {where}; a folder of task YAML files over "
                        f"local data (--lm-eval-include DIR, like {BUNDLED_TASKS}) works "
                        f"offline") from None


def _set_fewshot(task, fewshot: int | None) -> None:
    """As the harness's simple_evaluate sets it: a task fixed at 0 shots stays at 0."""
    if fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)  # the harness's default fewshot_random_seed


def _task_info(loaded: dict) -> dict:
    info = {}
    for task_dict in loaded.values():
        for name, task in task_dict["tasks"].items():
            config = task.dump_config() if hasattr(task, "dump_config") else {}
            text = json.dumps(config, sort_keys=True, default=_stable_text)
            info[name] = {"version": task.VERSION if hasattr(task, "VERSION") else
                          (config.get("metadata") or {}).get("version"),
                          "num_fewshot": task.get_config("num_fewshot"),
                          "config_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return info


def _stable_text(value) -> str:
    """JSON text of a config value that is not JSON: a function (a task's process_docs) by its
    name and source, not by its repr, whose memory address changes from run to run."""
    if callable(value) and hasattr(value, "__qualname__"):
        try:
            source = inspect.getsource(value)
        except (OSError, TypeError):
            source = ""
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}\n{source}"
    return str(value)


def _quiet(verbose: bool) -> None:
    """The harness's (and datasets') logging and bars only with --verbose."""
    import datasets

    logging.getLogger("lm_eval").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        datasets.disable_progress_bars()


def evaluate(model, tokenizer, tasks: HarnessTasks, condition: str = "baseline") -> dict:
    """{task: {metric: value}} of every task (groups: the group and each subtask)."""
    from lm_eval import evaluator
    from tqdm.auto import tqdm

    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstrap in this process: no fork
    lm = _model_in_memory(model, tokenizer, tasks)
    metrics: dict[str, dict] = {}
    bar = tqdm(tasks.loaded.items(), desc=f"lm-eval [{condition}]", leave=False,
               disable=tasks.progress)  # --verbose: the harness's own bars and logging instead
    for name, task_dict in bar:
        bar.set_postfix_str(name)
        with _harness_output(tasks.progress):
            results = evaluator.evaluate(lm=lm, task_dict=task_dict, limit=tasks.limit,
                                         bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
        metrics.update(parse_results(results))
    return metrics


def _harness_output(verbose: bool):
    """The harness prints and draws bars of its own: shown with --verbose, else set aside."""
    if verbose:
        return contextlib.nullcontext()
    sink = io.StringIO()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(sink))
    stack.enter_context(contextlib.redirect_stderr(sink))
    return stack


def _model_in_memory(model, tokenizer, tasks: HarnessTasks):
    """One HFLM around the run's model object, made once and kept (it holds no weights)."""
    if tasks._lm is None:
        from lm_eval.models.huggingface import HFLM

        class InMemoryLM(HFLM):
            def loglikelihood(self, requests, disable_tqdm: bool = False):  # noqa: ARG002
                # the harness's own choice is replaced by the run's: one bar with --verbose
                return super().loglikelihood(requests, disable_tqdm=not tasks.progress)

        tasks._lm = InMemoryLM(pretrained=model, tokenizer=tokenizer,
                               batch_size=tasks.batch_size)
    return tasks._lm


def parse_results(results: dict) -> dict[str, dict]:
    """The harness's results -> {task: {metric: value, metric_stderr: value, n}}."""
    out = {}
    samples = results.get("n-samples", {})
    for task, values in results["results"].items():
        keys = [k for k in values if "," in k]  # "metric,filter" and "metric_stderr,filter"
        filters: dict[str, set] = {}
        for key in keys:
            metric, filter_name = key.split(",", 1)
            filters.setdefault(metric.removesuffix("_stderr"), set()).add(filter_name)
        metrics = {}
        for key in keys:
            metric, filter_name = key.split(",", 1)
            one_filter = len(filters[metric.removesuffix("_stderr")]) == 1
            metrics[metric if one_filter else key] = None if values[key] == "N/A" else values[key]
        if task in samples:
            metrics["n"] = samples[task].get("effective")
        out[task] = metrics
    return out
