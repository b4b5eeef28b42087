"""The items of the built-in downstream tasks: where they come from (the bundled original
sample sets in src/data/tasks, a local JSONL in the public schema, or the hub), how each item is
checked, and the documents' text as the harness prepares it. Shared by the built-in scorer
(src/eval/downstream.py) and the bundled harness tasks (src/data/harness_tasks), so both paths
see identical items.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from src.errors import UserError
from src.utils import hub

DATA_DIR = Path(__file__).resolve().parent / "tasks"


class TaskDataError(UserError, ValueError):
    """Task data that cannot be used: the one-line message names the file/line and the fix."""


# ----------------------------------------------------------------------------- documents

def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag text clean-up (WikiHow bracket artefacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(item: dict) -> tuple[str, list[str], int]:
    """(query, choices, gold index) of one HellaSwag item."""
    ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize()
    query = hellaswag_preprocess(item["activity_label"] + ": " + ctx)
    choices = [hellaswag_preprocess(ending) for ending in item["endings"]]
    return query, choices, int(item["label"])


def _hellaswag_check(item: dict) -> str | None:
    for field in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(item.get(field), str):
            return f"field '{field}' must be a string" if field in item else f"missing field '{field}'"
    endings = item.get("endings")
    if endings is None:
        return "missing field 'endings'"
    if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
        return "field 'endings' must be a list of at least 2 strings"
    if not all(hellaswag_preprocess(e) for e in endings):
        return "an ending is empty after preprocessing"
    label = item.get("label")
    if label is None:
        return "missing field 'label'"
    if isinstance(label, bool) or not (isinstance(label, int) or (isinstance(label, str) and label.isdigit())):
        return f"field 'label' must be an integer index, got {label!r}"
    if not 0 <= int(label) < len(endings):
        return f"field 'label' {label!r} is not an index into the {len(endings)} endings"
    return None


def lambada_split(text: str) -> tuple[str, str]:
    """(context, continuation): the text before its last space, and " " + the last word."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def _lambada_check(item: dict) -> str | None:
    if "text" not in item:
        return "missing field 'text'"
    if not isinstance(item["text"], str) or not item["text"].strip():
        return "field 'text' must be a non-empty string"
    return None


@dataclass(frozen=True)
class TaskSource:
    """Where a task's items come from and how one is checked."""
    name: str
    hub: tuple[str, str | None, str]  # (dataset path, config, split) for datasets.load_dataset
    check: Callable[[dict], str | None]  # None when the item is usable, else what is wrong

    @property
    def bundled_path(self) -> Path:
        return DATA_DIR / f"{self.name}_samples.jsonl"


TASK_SOURCES: dict[str, TaskSource] = {
    "hellaswag": TaskSource("hellaswag", ("Rowan/hellaswag", None, "validation"), _hellaswag_check),
    "lambada": TaskSource("lambada", ("EleutherAI/lambada_openai", "default", "test"),
                          _lambada_check),
}


def source_of(task_name: str) -> TaskSource:
    if task_name not in TASK_SOURCES:
        raise TaskDataError(f"unknown downstream task '{task_name}'; available: "
                            f"{', '.join(TASK_SOURCES)}")
    return TASK_SOURCES[task_name]


# ----------------------------------------------------------------------------- data loading

def load_task_items(task_name: str, source: str | Path = "bundled", n_samples: int | None = None,
                    seed: int = 0) -> list[dict]:
    """Items of a task from "bundled" samples, "hub" (datasets.load_dataset) or a JSONL path.

    ``n_samples`` keeps N items picked by a seeded permutation, returned in their original order
    (all items when N is larger than what is available).
    """
    task = source_of(task_name)
    if str(source) == "bundled":
        items = _read_jsonl(task, task.bundled_path)
    elif str(source) == "hub":
        items = _load_hub(task)
    else:
        items = _read_jsonl(task, Path(source).expanduser())
    return select_items(items, n_samples, seed)


def select_items(items: list[dict], n_samples: int | None, seed: int = 0) -> list[dict]:
    if n_samples is None or n_samples >= len(items):
        return list(items)
    if n_samples < 1:
        raise TaskDataError(f"the number of task samples must be at least 1, got {n_samples}")
    picked = np.random.default_rng(seed).permutation(len(items))[:n_samples]
    return [items[i] for i in sorted(picked.tolist())]


def _read_jsonl(task: TaskSource, path: Path) -> list[dict]:
    hint = f"expected JSONL with one {task.name} item per line"
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise TaskDataError(f"{task.name} data file {path} {what}; {hint}")
    items = []
    try:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if line.strip():
                    items.append(_parse_line(task, path, lineno, line))
    except UnicodeDecodeError:
        raise TaskDataError(f"{task.name} data file {path} is not UTF-8 text; {hint}") from None
    if not items:
        raise TaskDataError(f"{task.name} data file {path} is empty; {hint}")
    return items


def _parse_line(task: TaskSource, path: Path, lineno: int, line: str) -> dict:
    where = f"{task.name} data file {path}, line {lineno}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(item, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    problem = task.check(item)
    if problem:
        raise TaskDataError(f"{where}: {problem}")
    return item


def _load_hub(task: TaskSource) -> list[dict]:
    path, config, split = task.hub
    rows = hub.load_dataset(path, config, split, f"{task.name} from the hub ({path}, split "
                            f"{split})", f"the bundled samples, or a local JSONL in the public "
                            f"schema (--task-data {task.name}=PATH), work offline")
    items = [dict(row) for row in rows]
    for index, item in enumerate(items):
        problem = task.check(item)
        if problem:
            raise TaskDataError(f"{task.name} hub dataset {path}, row {index}: {problem}")
    if not items:
        raise TaskDataError(f"{task.name} hub dataset {path} split {split} is empty")
    return items
