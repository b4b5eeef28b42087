"""Every file the tool writes: atomic (temp file + rename, so it appears whole or not at all),
with the usual permissions (the umask's, 0644 by default, not the 0600 of a temp file), and
with no credential in it (src/utils/secrets.py).

JSON is strict (any parser reads it): non-finite numbers are written as the strings "inf",
"-inf" and "nan", and ``read_json`` turns those strings back into floats.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

from src.utils.secrets import redact


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(temp, _file_mode())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return path


def to_jsonable(value):
    """Plain, strict-JSON Python: tensors/arrays -> lists, non-finite floats -> "inf"/"-inf"/
    "nan", paths -> str, tuples -> lists, every string redacted."""
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
    if isinstance(value, (float, np.floating)):
        return _finite_or_text(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (str, Path)):
        return redact(str(value))
    return value


def _finite_or_text(number: float):
    if math.isfinite(number):
        return number
    return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")


def write_json(path, data) -> Path:
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=False)
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
    return _atomic(path, lambda stream: stream.write(redact(text).encode("utf-8")))


def write_csv(path, frame) -> Path:
    return write_text(path, frame.to_csv(index=False))


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                      "int64": "I64", "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    return write_safetensors_streamed(
        path, [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()],
        iter(tensors.items()), metadata)


def write_safetensors_streamed(path, layout: list, tensors, metadata: dict | None = None) -> Path:
    """A safetensors file written one tensor at a time, so that it never sits in memory whole
    (at 8B weights the scores are 32 GB; a sharded run gathers each whole tensor only when its
    turn comes). ``layout``: [(name, torch dtype, shape)] in file order; ``tensors``: an
    iterator of (name, tensor) in that order. The format: an 8-byte little-endian header
    length, the JSON header (dtype, shape and byte range of each tensor, padded to 8 bytes),
    then the tensors' bytes."""
    import torch

    header: dict = {"__metadata__": {k: redact(str(v)) for k, v in (metadata or {}).items()}}
    offset = 0
    for name, dtype, shape in layout:
        n_bytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")],
                        "shape": list(shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(stream):
        stream.write(len(text).to_bytes(8, "little"))
        stream.write(text)
        for (name, dtype, shape), (got, tensor) in zip(layout, tensors, strict=True):
            if got != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"safetensors: expected {name} {dtype} {shape}, got {got} "
                                 f"{tensor.dtype} {tuple(tensor.shape)}")
            flat = tensor.detach().contiguous().cpu().reshape(-1)
            stream.write(memoryview(flat.view(torch.uint8).numpy()))

    return _atomic(path, write)


def update_json(path, key: str, value) -> Path:
    """Set one top-level key of a JSON object file (created if missing), atomically.

    Lets several optional analyses share ``enhanced_analysis.json``, one key each.
    """
    path = Path(path)
    data = read_json(path) if path.is_file() else {}
    data[key] = value
    return write_json(path, data)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (model weights and scores are gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
