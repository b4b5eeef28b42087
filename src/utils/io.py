"""Atomic writes: every output file appears whole or not at all (temp file + rename)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return path


def to_jsonable(value):
    """Plain Python for json: tensors/arrays -> lists/floats, paths -> str, tuples -> lists."""
    import numpy as np
    import torch

    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path, data) -> Path:
    """JSON with non-finite floats written as Infinity / NaN (read back by Python's json)."""
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=True)
    return _atomic(path, lambda stream: stream.write(text.encode()))


NON_FINITE_TEXT = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def decode_non_finite(value):
    """JSON as written by ``write_json`` back to Python: the strings "inf", "-inf" and "nan"
    become floats again (no other string is touched)."""
    if isinstance(value, dict):
        return {k: decode_non_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_non_finite(v) for v in value]
    if isinstance(value, str) and value in NON_FINITE_TEXT:
        return NON_FINITE_TEXT[value]
    return value


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return decode_non_finite(json.load(handle))


def write_text(path, text: str) -> Path:
    return _atomic(path, lambda stream: stream.write(text.encode("utf-8")))


def write_csv(path, frame) -> Path:
    return _atomic(path, lambda stream: stream.write(frame.to_csv(index=False).encode()))


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save

    payload = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                   metadata={k: str(v) for k, v in (metadata or {}).items()})
    return _atomic(path, lambda stream: stream.write(payload))


def update_json(path, key: str, value) -> Path:
    """Set one top-level key of a JSON object file (created if missing), atomically.

    Lets several optional analyses share ``enhanced_analysis.json``, one key each.
    """
    path = Path(path)
    data = read_json(path) if path.is_file() else {}
    data[key] = value
    return write_json(path, data)
