"""Data and document processing of the bundled lm-evaluation-harness tasks (cwa_hellaswag,
cwa_lambada): the bundled original sample sets of src/data/tasks, read and processed by the
same code as the built-in scorer (src/data/task_items.py), so both paths see identical items.

The harness imports this file by path; run it from the project root (so that ``src`` imports).
"""
import datasets

from src.data.task_items import hellaswag_doc, load_task_items


def _split(task: str, split: str) -> dict:
    return {split: datasets.Dataset.from_list(load_task_items(task))}


def hellaswag_dataset(**kwargs) -> dict:
    return _split("hellaswag", "validation")


def lambada_dataset(**kwargs) -> dict:
    return _split("lambada", "test")


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def process(doc):
        query, choices, gold = hellaswag_doc(doc)
        return {"query": query, "choices": choices, "gold": gold}
    return dataset.map(process)
