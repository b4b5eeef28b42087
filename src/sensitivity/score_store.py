"""scores.safetensors: a run's score tensors (and Hutchinson standard errors), with what they
score, so that a resumed run or a new experiment can use them instead of scoring again.

Metadata (key ``cwa``, JSON): the metric and the options that change its scores, the model
fingerprint (a hash over every parameter's name, shape, dtype and a fixed sample of its values),
the scored parameter names, the calibration blocks' hash, and how long scoring took.
``check_match`` says, in one line, why stored scores do not fit a run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from src.errors import UserError
from src.sensitivity.metrics import METRICS
from src.sensitivity.scoring import MetricOutput
from src.utils.io import file_sha256, write_safetensors

FILE_NAME = "scores.safetensors"
STDERR_SUFFIX = "::stderr"
SAMPLE_VALUES = 64  # values per parameter in the model fingerprint


@dataclass
class StoredScores:
    output: MetricOutput
    meta: dict
    path: Path
    sha256: str


def model_fingerprint(model) -> str:
    """sha256 over every parameter's name, shape, dtype and SAMPLE_VALUES values at fixed
    positions (one small gather per parameter; identical across devices and processes)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        count = min(SAMPLE_VALUES, flat.numel())
        # integer spacing: float positions round past the end of large tensors
        positions = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)
        sample = flat[positions.to(flat.device)].float().cpu()
        digest.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def describe(metric: str, job, model_fingerprint_: str, calibration_sha256: str,
             seconds: float) -> dict:
    options = {key: getattr(job, key) for key in METRICS[metric].options}
    return {"metric": metric, "options": options, "model_fingerprint": model_fingerprint_,
            "parameters": list(job.params), "calibration_sha256": calibration_sha256,
            "scoring_seconds": round(seconds, 3), "convention": "stored parameter layout"}


def save(path: Path, scored: MetricOutput, meta: dict) -> Path:
    tensors = dict(scored.scores)
    tensors.update({f"{n}{STDERR_SUFFIX}": s for n, s in scored.extra.get("stderr", {}).items()})
    return write_safetensors(path, tensors, {"cwa": json.dumps(meta), "metric": meta["metric"]})


def locate(path: str) -> Path:
    """A run folder's scores.safetensors, or the file itself."""
    candidate = Path(path).expanduser()
    return candidate / FILE_NAME if candidate.is_dir() else candidate


def read_meta(path: Path) -> dict:
    """The metadata of a scores file (UserError when it is not one of ours)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("cwa", "null"))
    except (OSError, ValueError, SafetensorError) as error:
        raise UserError(f"'{path}' is not a readable scores.safetensors ({error})") from None
    if not isinstance(meta, dict) or "model_fingerprint" not in meta:
        raise UserError(f"'{path}' holds no score metadata (written by an older version, or "
                        f"not by this tool); score again")
    return meta


def load(path: Path, params: dict[str, torch.nn.Parameter]) -> StoredScores:
    """The scores on each parameter's device, in float32."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    tensors = load_file(str(path))
    scores = {n: tensors[n].to(p.device) for n, p in params.items()}
    stderr = {n: tensors[f"{n}{STDERR_SUFFIX}"].to(p.device) for n, p in params.items()
              if f"{n}{STDERR_SUFFIX}" in tensors}
    output = MetricOutput(scores, {"stderr": stderr} if stderr else {})
    return StoredScores(output, meta, path, file_sha256(path))


def mismatch(meta: dict, metric: str, job, fingerprint: str) -> str | None:
    """Why stored scores cannot stand for this run's scoring, or None when they can."""
    if meta["metric"] != metric:
        return f"they are {meta['metric']} scores, this run asks for {metric}"
    if meta["model_fingerprint"] != fingerprint:
        return "they score another model (or other weights)"
    if meta["parameters"] != list(job.params):
        return ("they score another set of weights (other --layers, --target-*, "
                "--include-embeddings)")
    for key, value in meta.get("options", {}).items():
        if getattr(job, key) != value:
            return f"they were scored with {key}={value}, this run has {getattr(job, key)}"
    return None
