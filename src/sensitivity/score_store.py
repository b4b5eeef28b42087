"""scores.safetensors: a run's score tensors (and Hutchinson standard errors), with what they
score, so that a resumed run or a new experiment can use them instead of scoring again.

Metadata (key ``cwa``, JSON): the metric and the options that change its scores, the model
fingerprint (a hash over every parameter's name, shape, dtype and a fixed sample of its values),
the scored parameter names, the calibration data (source, block length, blocks asked and got,
the blocks' hash), how long scoring took, and the metric's facts (how it computed them, e.g.
Hutchinson's probes per batch and the precision reached). ``mismatch`` says, in one line, why stored scores
cannot stand for a run's; ``calibration_differences`` what differs in the data they were
computed on (scores of another model, weights, metric or option never fit; scores of other
calibration data are the same kind of scores, of other text).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from src.data.loading import DataSplit
from src.errors import UserError
from src.sensitivity.metrics import METRICS, option_value
from src.sensitivity.scoring import MetricOutput
from src.distributed import sharding
from src.distributed.ranks import Ranks
from src.utils.io import file_sha256, write_safetensors, write_safetensors_streamed

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
    positions (one small gather per parameter; identical across devices and processes, and
    with or without --shard, where it is a collective)."""
    named = dict(model.named_parameters())
    positions = {}
    for name, p in named.items():
        count = min(SAMPLE_VALUES, p.numel())
        # integer spacing: float positions round past the end of large tensors
        positions[name] = torch.arange(count) * (p.numel() - 1) // max(count - 1, 1)
    ranks = sharding.ranks_of(model)
    if ranks is not None:
        layout = sharding.Layout.of(named, ranks)
        samples = layout.values_at({n: (sharding.local(p), positions[n])
                                    for n, p in named.items()})
    else:
        samples = {n: p.detach().reshape(-1)[positions[n].to(p.device)].cpu()
                   for n, p in named.items()}
    digest = hashlib.sha256()
    for name, p in named.items():
        digest.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        digest.update(samples[name].float().numpy().tobytes())
    return digest.hexdigest()


def describe(metric: str, job, model_fingerprint_: str, calibration: dict,
             seconds: float, facts: dict | None = None) -> dict:
    """The metadata of scores computed now (``calibration``: ``calibration_of`` the run;
    ``facts``: the metric's ``MetricOutput.facts``)."""
    options = {key: option_value(metric, job, key) for key in METRICS[metric].options}
    return {"metric": metric, "options": options, "model_fingerprint": model_fingerprint_,
            "parameters": list(job.params), "calibration_sha256": calibration["sha256"],
            "calibration": calibration, "scoring_seconds": round(seconds, 3),
            "convention": "stored parameter layout", "facts": facts or {}}


CALIBRATION_SETTINGS = ("source", "max_length", "max_samples")


def calibration_of(data: DataSplit, max_length: int, max_samples: int) -> dict:
    """What scores are computed on: the text's source, tokens per block, the blocks asked for
    and got, and the hash of the calibration blocks."""
    return {"source": data.source, "max_length": max_length, "max_samples": max_samples,
            "blocks": len(data.calibration), "sha256": data.calibration.sha256()}


def stored_calibration(meta: dict) -> dict:
    """The calibration data of stored scores (files from before it was recorded: the hash)."""
    return meta.get("calibration") or {"sha256": meta["calibration_sha256"]}


def calibration_differences(meta: dict, calibration: dict) -> dict[str, tuple]:
    """setting -> (the stored scores', this run's) for each of CALIBRATION_SETTINGS that
    differs, or {"sha256": ...} when only the text did; {} when the scores were computed on
    exactly this run's calibration blocks (whatever the blocks asked for, when both got the
    same ones)."""
    stored = stored_calibration(meta)
    if stored["sha256"] == calibration["sha256"] and \
            stored.get("max_length", calibration["max_length"]) == calibration["max_length"]:
        return {}
    differing = {key: (stored[key], calibration[key]) for key in CALIBRATION_SETTINGS
                 if key in stored and stored[key] != calibration[key]}
    return differing or {"sha256": (stored["sha256"], calibration["sha256"])}


def save(path: Path, scored: MetricOutput, meta: dict, ranks: Ranks = Ranks(),
         layout=None) -> Path | None:
    """Write the scores (and standard errors) on rank 0; the other ranks write nothing (None).
    ``layout`` (sharding.Layout) when they are this rank's shards: a collective, rank 0 writes
    the whole tensors, gathered one at a time."""
    tensors = dict(scored.scores)
    tensors.update({f"{n}{STDERR_SUFFIX}": s for n, s in scored.extra.get("stderr", {}).items()})
    metadata = {"cwa": json.dumps(meta), "metric": meta["metric"]}
    if layout is None:
        return write_safetensors(path, tensors, metadata) if ranks.is_main else None
    shapes = {name: _whole_shape(name, t, layout) for name, t in tensors.items()}
    whole = ((name, sharding.whole_on_main(t, shapes[name], layout.ranks))
             for name, t in tensors.items())
    if not layout.ranks.is_main:
        for _ in whole:  # take part in every gather
            pass
        return None
    return write_safetensors_streamed(
        path, [(name, t.dtype, shapes[name]) for name, t in tensors.items()], whole, metadata)


def _whole_shape(name: str, part: torch.Tensor, layout) -> tuple:
    """The full shape of a sharded score tensor: its rows are split, the rest is whole."""
    row_numel = math.prod(part.shape[1:])
    numel = layout.numel[name.removesuffix(STDERR_SUFFIX)]
    return (numel // row_numel if row_numel else 0, *part.shape[1:])


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
    """The scores on each parameter's device, in float32: the rows this process holds (all of
    them unless --shard), read from the file without reading the rest."""
    from safetensors import safe_open

    meta = read_meta(path)
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())

        def rows_of(key: str, param) -> torch.Tensor:
            rows = sharding.local_rows(param)
            return handle.get_slice(key)[rows.start:rows.stop].to(sharding.local(param).device)

        scores = {n: rows_of(n, p) for n, p in params.items()}
        stderr = {n: rows_of(f"{n}{STDERR_SUFFIX}", p) for n, p in params.items()
                  if f"{n}{STDERR_SUFFIX}" in stored}
    output = MetricOutput(scores, {"stderr": stderr} if stderr else {}, meta.get("facts") or {})
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
        if option_value(metric, job, key) != value:
            return (f"they were scored with {key}={value}, this run has "
                    f"{option_value(metric, job, key)}")
    return None
