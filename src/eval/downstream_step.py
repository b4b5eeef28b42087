"""The downstream-task step of a run: the built-in tasks (src/eval/downstream.py) and any
lm-evaluation-harness task (src/eval/harness.py), on the baseline and inside every condition.

``downstream_results.json``: ``baseline`` {task: metrics}, and with ``--perturb`` a list of
``conditions`` {selection, seed, method, tasks: {task: metrics}, delta: {task: {metric:
change}}} in the same order as perturbation_results.json; ``lm_eval`` records the harness
version and each harness task's version and config hash.
"""
from __future__ import annotations

import math

from src.data.task_items import load_task_items
from src.eval import harness
from src.eval.downstream import evaluate_tasks
from src.utils.format import fixed

ACCURACY_METRICS = ("acc", "acc_norm", "exact_match")  # fractions correct: plotted, reported


def load_items(tasks, task_data, n_samples, seed: int) -> dict[str, list[dict]]:
    sources = dict(task_data)
    return {task: load_task_items(task, sources.get(task, "bundled"), n_samples, seed)
            for task in tasks}


def is_score(metric: str, value) -> bool:
    """A metric whose change under a perturbation is reported (not a stderr or a count)."""
    return metric != "n" and not metric.endswith("_stderr") and \
        isinstance(value, (int, float)) and not isinstance(value, bool)


def deltas(metrics: dict, baseline: dict) -> dict:
    return {task: {m: value - baseline[task][m] for m, value in metrics[task].items()
                   if is_score(m, value) and is_score(m, baseline[task].get(m))}
            for task in metrics if task in baseline}


class DownstreamRecorder:
    """Evaluates the tasks on the unperturbed model and inside every perturbation condition."""

    def __init__(self, model, tokenizer, items: dict, batch_size: int,
                 harness_tasks: harness.HarnessTasks | None = None, previous: dict | None = None):
        """``previous``: the downstream_results.json of the unfinished run being resumed; its
        baseline is kept, and its conditions are offered to
        ``keep`` as the experiments keep theirs."""
        self.model, self.tokenizer, self.items, self.batch_size = model, tokenizer, items, batch_size
        self.harness_tasks = harness_tasks
        self.conditions: list[dict] = []
        # --resume runs only with the same command, so the same tasks: a saved baseline fits
        self.resumed = bool(previous and previous.get("baseline"))
        self.previous_conditions = previous.get("conditions", []) if self.resumed else []
        self.baseline = previous["baseline"] if self.resumed else self.evaluate("baseline")

    def keep(self, rows: list[dict], method: str) -> int:
        """With --resume: take over the previous run's task results for the leading ``rows``
        (finished conditions) that have them; returns how many rows that is."""
        offered = self.previous_conditions[len(self.conditions):]
        n = 0
        for row, done in zip(rows, offered):
            if (done["selection"], done["seed"], done["method"]) != \
                    (row["selection"], row["seed"], method):
                break
            n += 1
        self.conditions.extend(offered[:n])
        return n

    def evaluate(self, condition: str) -> dict:
        metrics = evaluate_tasks(self.model, self.tokenizer, self.items, self.batch_size)
        if self.harness_tasks is not None:
            metrics.update(harness.evaluate(self.model, self.tokenizer, self.harness_tasks,
                                            condition))
        return metrics

    def on_condition(self, condition, method: str) -> None:
        metrics = self.evaluate(f"{condition.selection_name} seed {fixed(condition.seed)}")
        self.conditions.append({"selection": condition.selection_name, "seed": condition.seed,
                                "method": method, "tasks": metrics,
                                "delta": deltas(metrics, self.baseline)})

    def results(self, complete: bool = True) -> dict:
        n_items = {t: len(v) for t, v in self.items.items()}
        n_items.update({t: m.get("n") for t, m in self.baseline.items() if t not in n_items})
        return {"tasks": list(self.baseline), "n_items": n_items, "complete": complete,
                "lm_eval": self.harness_tasks.info if self.harness_tasks else None,
                "baseline": self.baseline, "conditions": self.conditions}

    def print_summary(self) -> None:
        for task, metrics in self.baseline.items():
            shown = ", ".join(f"{k} {fixed(v, 4)}" for k, v in metrics.items() if is_score(k, v))
            print(f"[cwa] downstream {task} (n={metrics.get('n')}): {shown}")
        for row in self.conditions:
            changes = "; ".join(f"{task} " + ", ".join(f"Δ{k} {_signed(v)}" for k, v in d.items())
                                for task, d in row["delta"].items())
            print(f"  {row['method']} {row['selection']:<9} seed {fixed(row['seed'])}: {changes}")


def _signed(value: float) -> str:
    return f"{value:+.4f}" if math.isfinite(value) else fixed(value)
