"""The downstream-task step of a run: flags -> task items -> baseline and per-condition scores.

``downstream_results.json``: ``baseline`` {task: metrics}, and with ``--perturb`` a list of
``conditions`` {selection, seed, method, tasks: {task: metrics}, delta: {task: {metric: change}}}
in the same order as perturbation_results.json.
"""
from __future__ import annotations

from src.errors import UserError
from src.eval.downstream import TASKS, evaluate_tasks, load_task_items

DELTA_METRICS = ("acc", "acc_norm", "perplexity")


def parse_task_names(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown --downstream-tasks entry '{(unknown or [text])[0]}'; choose from "
                        f"{', '.join(TASKS)}")
    return names


def parse_task_data(text: str | None, tasks: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """'hellaswag=PATH,lambada=hub' -> (("hellaswag", PATH), ("lambada", "hub"))."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        task, sep, source = item.partition("=")
        task, source = task.strip(), source.strip()
        if not sep or not source:
            raise UserError(f"bad --task-data entry '{item}': use TASK=PATH (or TASK=hub)")
        if task not in tasks:
            raise UserError(f"--task-data names '{task}', which is not in --downstream-tasks")
        pairs.append((task, source))
    return tuple(pairs)


def load_items(tasks, task_data, n_samples, seed: int) -> dict[str, list[dict]]:
    sources = dict(task_data)
    return {task: load_task_items(task, sources.get(task, "bundled"), n_samples, seed)
            for task in tasks}


def deltas(metrics: dict, baseline: dict) -> dict:
    return {task: {m: metrics[task][m] - baseline[task][m]
                   for m in DELTA_METRICS if m in metrics[task] and m in baseline[task]}
            for task in metrics}


class DownstreamRecorder:
    """Evaluates the tasks on the unperturbed model and inside every perturbation condition."""

    def __init__(self, model, tokenizer, items: dict, batch_size: int):
        self.model, self.tokenizer, self.items, self.batch_size = model, tokenizer, items, batch_size
        self.baseline = evaluate_tasks(model, tokenizer, items, batch_size)
        self.conditions: list[dict] = []

    def on_condition(self, condition, method: str) -> None:
        metrics = evaluate_tasks(self.model, self.tokenizer, self.items, self.batch_size)
        self.conditions.append({"selection": condition.selection_name, "seed": condition.seed,
                                "method": method, "tasks": metrics,
                                "delta": deltas(metrics, self.baseline)})

    def results(self) -> dict:
        return {"tasks": list(self.items), "n_items": {t: len(v) for t, v in self.items.items()},
                "baseline": self.baseline, "conditions": self.conditions}

    def print_summary(self) -> None:
        for task, metrics in self.baseline.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in DELTA_METRICS)
            print(f"[cwa] downstream {task} (n={metrics['n']}): {shown}")
        for row in self.conditions:
            changes = "; ".join(f"{task} " + ", ".join(f"Δ{k} {v:+.4f}" for k, v in d.items())
                                for task, d in row["delta"].items())
            print(f"  {row['selection']:<9} seed {row['seed']}: {changes}")
