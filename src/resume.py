"""--resume: what an unfinished run left in its folder, and whether this command may continue it.

A run that did not succeed (killed: ``running`` with a dead pid, ``failed``, ``interrupted``)
leaves its scores (scores.safetensors, written right after scoring) and every condition that
finished (results are saved after each). Continuing it with the same command keeps all of that:
the scores are loaded instead of recomputed, finished perturbation, quantization and downstream
conditions are kept and only the rest run, a finished stability check and finished analysis
sections are kept. Everything else runs again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from src.sensitivity import score_store
from src.sensitivity.experiment import BLOCK_FILES

IGNORED_FLAGS = ("resume", "overwrite", "verbose", "quiet", "out_dir", "report_to",
                 "tracking_uri", "tracking_experiment")  # may differ between the two runs


@dataclass
class Previous:
    """What the unfinished run in a folder left."""
    manifest: dict
    scores: Path | None = None
    perturbation_rows: list[dict] = field(default_factory=list)
    quantization_rows: list[dict] = field(default_factory=list)
    downstream: dict | None = None
    stability: dict | None = None
    analyses: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)  # experiment -> its blocks CSV as a DataFrame

    @property
    def previous_seconds(self) -> dict:
        return self.manifest.get("timings_seconds") or {}


def _read(path: Path):
    from src.utils.io import read_json

    return read_json(path) if path.is_file() else None


def refusal(out_dir: str, config_dict: dict, defaults: dict) -> str | None:
    """Why ``--resume`` cannot continue the run in ``out_dir`` with this configuration.
    ``defaults``: every flag's default, which a run written before the flag existed had."""
    folder = Path(out_dir)
    manifest, saved = _read(folder / "experiment_manifest.json"), _read(folder / "config.json")
    if manifest is None or saved is None:
        return f"--resume: '{out_dir}' holds no run to continue (no manifest or config.json)"
    if manifest.get("status", "succeeded" if manifest.get("success") else "failed") == \
            "succeeded":
        return (f"--resume: the run in '{out_dir}' succeeded, there is nothing to continue; "
                f"--overwrite runs it again")
    differing = differences({**defaults, **saved}, config_dict)
    if differing:
        return (f"--resume needs the same command as the run in '{out_dir}'; these flags "
                f"differ: {'; '.join(differing)}")
    return None


def differences(saved: dict, current: dict) -> list[str]:
    """'--flag: now X, the run had Y' for every setting that differs (ignoring IGNORED_FLAGS)."""
    out = []
    for name in sorted(set(saved) | set(current)):
        if name in IGNORED_FLAGS:
            continue
        was, now = _plain(saved.get(name)), _plain(current.get(name))
        if was != now:
            out.append(f"--{name.replace('_', '-')}: now {now}, the run had {was}")
    return out


def _plain(value):
    """Settings as config.json holds them (tuples as lists) for comparison."""
    return json.loads(json.dumps(value, default=str))


def read_previous(out_dir: Path) -> Previous:
    manifest = _read(out_dir / "experiment_manifest.json") or {}
    scores = out_dir / score_store.FILE_NAME
    perturbation = _read(out_dir / "perturbation_results.json") or {}
    quantization = _read(out_dir / "quantization_results.json") or {}
    enhanced = _read(out_dir / "enhanced_analysis.json") or {}
    blocks = {name: pd.read_csv(out_dir / file) for name, file in BLOCK_FILES.items()
              if (out_dir / file).is_file()}
    return Previous(manifest, scores if scores.is_file() else None,
                    list(perturbation.get("conditions", [])),
                    list(quantization.get("conditions", [])),
                    _read(out_dir / "downstream_results.json"),
                    _read(out_dir / "stability_results.json"), enhanced, blocks)


def record(previous: Previous, kept: dict) -> dict:
    """The manifest's ``resumed`` section: what was kept and about how much time it saved (the
    scoring time recorded with the scores, the kept conditions' own times, and the previous
    run's timings of the other kept steps)."""
    seconds = kept.get("scoring_seconds", 0.0)
    seconds += sum(row.get("seconds", 0.0) for row in previous.perturbation_rows
                   [:kept.get("perturbation_conditions", 0)])
    seconds += sum(row.get("seconds", 0.0) for row in previous.quantization_rows
                   [:kept.get("quantization_conditions", 0)])
    steps = [step for step in ("stability", "downstream_baseline") if kept.get(step)]
    for step in (*steps, *kept.get("analyses", ())):
        seconds += previous.previous_seconds.get(step, 0.0)
    at_step = kept.get("resumed_at_step")
    kept = {name: value for name, value in kept.items() if name != "resumed_at_step"}
    return {"from_status": previous.manifest.get("status"),
            "previous_started_at": previous.manifest.get("started_at"),
            "previous_pid": previous.manifest.get("pid"), "kept": kept,
            "resumed_at_step": at_step or "after every condition (the remaining steps ran)",
            "seconds_saved": round(seconds, 3)}
