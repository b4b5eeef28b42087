"""load_model(spec, ...) -> (model, tokenizer, info).

``spec`` is one of:

* ``smollm2-135m`` (the default, also ``builtin``): SmolLM2-135M-Instruct, cached on first use
  (src/models/builtin.py);
* a Hugging Face hub id (``gpt2``, ``meta-llama/Llama-3.1-8B``), with ``revision`` and
  ``trust_remote_code``;
* a local model folder, or a path to a ``.gguf`` file;
* ``random:<preset>`` or ``random:<path/to/config.json>``: randomly initialised, no download.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from src.errors import UserError
from src.models.builtin import (BUILTIN_ALIASES, BUILTIN_NAME, builtin_tokenizer,
                                default_cache_dir, ensure_cache)
from src.models.device_map import check_resident, dispatch_random, resolve_device_map
from src.models.presets import PRESETS
from src.models.properties import context_length

RANDOM_INIT_SEED = 0


# ----------------------------------------------------------------------------- devices, dtypes

def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; validates 'cpu', 'cuda', 'cuda:N'."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"bad --device '{device}': use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise UserError(f"bad --device '{device}': use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise UserError(f"bad --dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return table[dtype]


# ----------------------------------------------------------------------------- entry point

def load_model(spec: str | None, *, dtype: str = "auto", device: str = "auto",
               device_map: str | None = None, cache_dir: str | None = None,
               revision: str | None = None, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer; returns (model, tokenizer, info dict).

    The model is in eval mode on ``device`` (or spread by ``device_map``), with ``dtype``.
    """
    spec = spec or BUILTIN_NAME
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    device_map = resolve_device_map(device_map)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec in BUILTIN_ALIASES:
        model, tokenizer = _load_pretrained(str(ensure_cache(cache)), torch_dtype, device_map,
                                            None, False)
        source = "builtin"
    elif spec.startswith("random:"):
        build_on = torch.device("cpu") if device_map is not None else target
        model, tokenizer = _build_random(spec[len("random:"):], cache, torch_dtype, build_on)
        if device_map is not None:
            model = dispatch_random(model, device_map)
        source = "random"
    elif spec.endswith(".gguf"):
        model, tokenizer = _load_gguf_file(Path(spec), torch_dtype, device_map)
        source = "gguf"
    elif os.path.isdir(spec):
        model, tokenizer = _load_pretrained(spec, torch_dtype, device_map, None, trust_remote_code)
        source = "local"
    elif _looks_like_path(spec):
        raise UserError(f"model path '{spec}' does not exist; pass a model folder, a .gguf file, "
                        f"a hub id, random:<preset> or omit --model for {BUILTIN_NAME}")
    else:
        model, tokenizer = _load_from_hub(spec, torch_dtype, device_map, revision,
                                          trust_remote_code)
        source = "hub"
    if device_map is None and source != "random":
        model.to(target)
    if device_map is not None:
        check_resident(model)
    model.eval()
    _ensure_pad_token(tokenizer)
    info = _model_info(model, spec, source, torch_dtype, target, device_map)
    if device_map is not None:
        info["hf_device_map"] = {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()}
    return model, tokenizer, info


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1] \
        or spec.count("/") > 1 or spec.endswith((".json", ".safetensors", ".bin"))


def _ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _model_info(model, spec, source, torch_dtype, target, device_map) -> dict:
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "spec": spec, "source": source, "architecture": config.model_type,
        "class": type(model).__name__, "n_parameters": n_params,
        "max_context": context_length(config), "dtype": str(torch_dtype).replace("torch.", ""),
        "device": str(target), "device_map": device_map,
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "vocab_size": config.vocab_size,
    }


# ----------------------------------------------------------------------------- other sources

def _load_pretrained(path_or_id, torch_dtype, device_map, revision, trust_remote_code,
                     local_files_only=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code,
                  local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch_dtype,
                                                 device_map=device_map, **kwargs)
    return model, tokenizer


def _load_gguf_file(path: Path, torch_dtype, device_map):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise UserError(f"GGUF file '{path}' does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch_dtype, device_map=device_map)
    return model, tokenizer


def _load_from_hub(model_id, torch_dtype, device_map, revision, trust_remote_code):
    """Local HF cache first (no network); otherwise the hub, after a quick reachability check
    so that an offline machine gets one clear line at once instead of minutes of retries."""
    in_local_cache = True
    try:
        return _load_pretrained(model_id, torch_dtype, device_map, revision, trust_remote_code,
                                local_files_only=True)
    except OSError:
        in_local_cache = False
    if not in_local_cache and not hub_reachable():
        raise UserError(_hub_error_line(model_id, ConnectionError("hub unreachable")))
    try:
        return _load_pretrained(model_id, torch_dtype, device_map, revision, trust_remote_code)
    except OSError as error:
        raise UserError(_hub_error_line(model_id, error)) from None
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise UserError(f"'{model_id}' contains custom code: add --trust-remote-code if you "
                            f"trust it") from None
        raise


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub endpoint cannot be connected to quickly."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_error_line(model_id: str, error: Exception) -> str:
    text = str(error).lower()
    if "gated" in text or "401" in text or "403" in text or "access" in text and "restricted" in text:
        problem = "is gated: accept its licence on the hub and log in (huggingface-cli login)"
    elif "not a valid model identifier" in text or "repository not found" in text or "404" in text:
        problem = "is not a model on the hub, a local folder, or a .gguf file"
    else:
        problem = ("could not be loaded from the Hugging Face hub (offline or unreachable, and "
                   "not in the local HF cache)")
    return (f"model '{model_id}' {problem}; the built-in {BUILTIN_NAME} runs offline "
            f"(omit --model), or use --model random:<preset>")


# ----------------------------------------------------------------------------- random init

def _build_random(preset_or_path: str, cache: Path, torch_dtype, target: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = _random_config_dict(preset_or_path)
    tokenizer = builtin_tokenizer(cache) or local_bpe_tokenizer()
    if config_dict.get("vocab_size") is None:
        config_dict["vocab_size"] = len(tokenizer)
    if config_dict["vocab_size"] < len(tokenizer):
        raise UserError(f"random:{preset_or_path}: vocab_size {config_dict['vocab_size']} is "
                        f"smaller than the tokenizer's {len(tokenizer)} tokens")
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    torch.manual_seed(RANDOM_INIT_SEED)
    with torch.device(target):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return model, tokenizer


def _random_config_dict(preset_or_path: str) -> dict:
    if preset_or_path in PRESETS:
        return dict(PRESETS[preset_or_path])
    path = Path(preset_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"random:{preset_or_path}: config file does not exist")
        try:
            config_dict = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"random:{preset_or_path}: not valid JSON ({error})") from None
        if "model_type" not in config_dict:
            raise UserError(f"random:{preset_or_path}: the config has no 'model_type'")
        return config_dict
    raise UserError(f"unknown random preset '{preset_or_path}'; choose one of "
                    f"{', '.join(PRESETS)} or give a config.json path")


def local_bpe_tokenizer(vocab_size: int = 8192):
    """A byte-level BPE tokenizer trained on the bundled corpus: no download needed.

    Used for random models where the built-in model's package is absent (GPU machines).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from src.data.loading import bundled_documents

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(bundled_documents(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
