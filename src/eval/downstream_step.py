"""The downstream-task step of a run: task items -> baseline and per-condition scores.

``downstream_results.json``: ``baseline`` {task: metrics}, and with ``--perturb`` a list of
``conditions`` {selection, seed, method, tasks: {task: metrics}, delta: {task: {metric: change}}}
in the same order as perturbation_results.json.
"""
from __future__ import annotations

from src.eval.downstream import evaluate_tasks, load_task_items
from src.utils.format import fixed

DELTA_METRICS = ("acc", "acc_norm", "perplexity")


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

    def results(self, complete: bool = True) -> dict:
        return {"tasks": list(self.items), "n_items": {t: len(v) for t, v in self.items.items()},
                "complete": complete, "baseline": self.baseline, "conditions": self.conditions}

    def print_summary(self) -> None:
        for task, metrics in self.baseline.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in DELTA_METRICS)
            print(f"[cwa] downstream {task} (n={metrics['n']}): {shown}")
        for row in self.conditions:
            changes = "; ".join(f"{task} " + ", ".join(f"Δ{k} {v:+.4f}" for k, v in d.items())
                                for task, d in row["delta"].items())
            print(f"  {row['selection']:<9} seed {fixed(row['seed'])}: {changes}")
