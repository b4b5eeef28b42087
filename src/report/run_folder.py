"""One run's output folder, read through the output contract: the input of the report and of
every plot (the run's own plots read the folder it is writing, plus the score tensors it still
holds in memory).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from src.sensitivity.experiment import summarize
from src.utils.io import decode_non_finite
from src.utils.output import process_alive

JSON_FILES = {"config": "config.json", "manifest": "experiment_manifest.json",
              "perturbation": "perturbation_results.json",
              "stability": "stability_results.json", "downstream": "downstream_results.json",
              "enhanced": "enhanced_analysis.json", "sensitivity_stats": "sensitivity_stats.json",
              "quantization": "quantization_results.json"}
RUN_MARKERS = ("config.json", "experiment_manifest.json")
MODE_NAMES = {"per_layer": "per_tensor"}  # folders written before the mode was renamed


class RunFolderError(Exception):
    """A run folder that cannot be read (the message names the file and the problem)."""


class InputAbsent(Exception):
    """A file or section that a reader needs is not in this run; the message says which flag
    makes it."""


@dataclass
class RunFolder:
    path: Path
    config: dict
    label: str = ""
    manifest: dict | None = None
    perturbation: dict | None = None
    stability: dict | None = None
    downstream: dict | None = None
    enhanced: dict | None = None
    sensitivity_stats: dict | None = None
    quantization: dict | None = None
    plots: list[Path] = field(default_factory=list)
    # only while the run that writes the folder is in memory:
    score_summary: object = None        # report.run_plots.ScoreSummary of the scores
    metas: dict | None = None           # name -> ParamMeta
    table: pd.DataFrame | None = None   # the top_weights table

    @classmethod
    def read(cls, folder: Path, label: str = "") -> RunFolder:
        folder = Path(folder)
        data = {}
        for key, name in JSON_FILES.items():
            if (folder / name).is_file():
                data[key] = read_json_file(folder / name)
                if not isinstance(data[key], dict):
                    raise RunFolderError(f"{name} does not hold a JSON object")
        config = data.pop("config", None) or (data.get("manifest") or {}).get("config")
        if not isinstance(config, dict):
            raise RunFolderError("neither config.json nor the manifest holds the run's "
                                 "configuration")
        config = {**config, "mode": MODE_NAMES.get(config.get("mode"), config.get("mode"))}
        run = cls(folder, config, label or folder.name, **data, table=_read_table(folder))
        run._check_perturbation()
        plots = folder / "plots"
        run.plots = sorted(p for p in plots.glob("*") if p.is_file()) if plots.is_dir() else []
        return run

    def _check_perturbation(self) -> None:
        p = self.perturbation
        if p is not None and (not isinstance(p.get("baseline"), dict)
                              or not isinstance(p.get("conditions"), list)):
            raise RunFolderError("perturbation_results.json lacks 'baseline' or 'conditions'")

    def get(self, key, default=None):
        return self.config.get(key, default)

    @property
    def status(self) -> str:
        """succeeded, failed, interrupted, running, or killed (a manifest that still says
        running although its process is gone); "not started" without a manifest."""
        manifest = self.manifest
        if manifest is None:
            return "not started"
        status = manifest.get("status") or ("succeeded" if manifest.get("success") else "failed")
        if status == "running" and isinstance(manifest.get("pid"), int) and \
                not process_alive(manifest):
            return "killed"
        return status

    def incomplete_reason(self) -> str | None:
        """Why this run is not counted among the results (None when it succeeded)."""
        status = self.status
        if status == "succeeded":
            return None
        error = (self.manifest or {}).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return {"not started": "no experiment_manifest.json (still starting, or killed before "
                               "the run began)",
                "running": f"still running (pid {(self.manifest or {}).get('pid')})",
                "killed": f"killed while running (pid {(self.manifest or {}).get('pid')} is gone)",
                "interrupted": f"interrupted ({message})",
                }.get(status, f"the run failed ({message})")

    @property
    def top(self) -> pd.DataFrame | None:
        """The top_weights table, None when the run wrote none."""
        return self.table

    @property
    def summary(self) -> dict:
        """Per-selection perturbation statistics (as written, else recomputed the same way)."""
        p = self.perturbation
        return p.get("summary") or summarize(p["conditions"], p["baseline"]["perplexity"])

    def need(self, attribute: str, how: str) -> dict:
        value = getattr(self, attribute)
        if value is None:
            raise InputAbsent(f"no {JSON_FILES[attribute]}; {how}")
        return value

    def analysis(self, key: str, how: str) -> dict:
        enhanced = self.need("enhanced", how)
        if not isinstance(enhanced.get(key), dict):
            raise InputAbsent(f"no '{key}' analysis; {how}")
        return enhanced[key]


def _read_table(folder: Path) -> pd.DataFrame | None:
    path = folder / "top_weights.csv"
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise RunFolderError(f"top_weights.csv cannot be parsed ({error})") from None


def read_json_file(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return decode_non_finite(json.load(handle))
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path.name} is not valid JSON (line {error.lineno}, column "
                             f"{error.colno}: {error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path.name} cannot be read ({error})") from None


def find_run_folders(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(input folder, run folder) for every run below each input, in a stable order."""
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()  # overlapping inputs: each run once
    for root in inputs:
        folders = {p.parent for marker in RUN_MARKERS for p in root.rglob(marker)}
        for folder in sorted(folders):
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                found.append((root, folder))
    return found


def unique_labels(pairs: list[tuple[Path, Path]]) -> list[str]:
    """Path below the input; prefixed by the input's name, then its position, on collisions."""
    roots = list(dict.fromkeys(root for root, _ in pairs))
    labels = [_relative(root, folder) for root, folder in pairs]
    for widen in (lambda i: f"{pairs[i][0].resolve().name}/{labels[i]}",
                  lambda i: f"input{roots.index(pairs[i][0]) + 1}/{labels[i]}"):
        counts = pd.Series(labels).value_counts()
        labels = [widen(i) if counts[label] > 1 else label for i, label in enumerate(labels)]
    return labels


def _relative(root: Path, folder: Path) -> str:
    rel = folder.relative_to(root).as_posix()
    return folder.resolve().name if rel == "." else rel


def read_runs(inputs: list[Path]) -> tuple[list[RunFolder], list[tuple[str, str]]]:
    """Readable, succeeded runs, and (label, reason) for every folder left out: unreadable, or
    incomplete (running, killed, interrupted, failed)."""
    pairs = find_run_folders(inputs)
    runs, skipped = [], []
    for (_, folder), label in zip(pairs, unique_labels(pairs)):
        try:
            run = RunFolder.read(folder, label)
        except RunFolderError as error:
            skipped.append((label, f"skipped: {error}"))
            continue
        reason = run.incomplete_reason()
        if reason:
            skipped.append((label, f"incomplete, not counted: {reason}"))
        else:
            runs.append(run)
    return runs, skipped
