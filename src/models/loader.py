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

import difflib
import json
import os
import struct
from pathlib import Path

import torch

from src.errors import UserError, first_line
from src.distributed.sharding import shard_model
from src.models.builtin import (BUILTIN_ALIASES, BUILTIN_NAME, builtin_tokenizer,
                                default_cache_dir, ensure_cache)
from src.models.checkpoint import check_shapes_match, check_weight_files
from src.models.device_map import check_resident, dispatch_random, resolve_device_map
from src.models import random_init
from src.models.presets import PRESETS
from src.models.properties import context_length
from src.utils.hub import hub_reachable



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
               revision: str | None = None, trust_remote_code: bool = False, shard_over=None):
    """Load a causal LM and its tokenizer; returns (model, tokenizer, info dict).

    The model is in eval mode on ``device`` (or spread by ``device_map``), with ``dtype``.
    ``shard_over`` (Ranks with ``sharded``, --shard): the model comes back sharded over the processes;
    no device ever holds the whole model (see ``_load_sharded`` and ``_skeleton``).
    """
    spec = spec or BUILTIN_NAME
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    device_map = resolve_device_map(device_map)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec.startswith("random:"):
        build_on = torch.device("cpu") if device_map is not None else target
        model, tokenizer = _build_random(spec[len("random:"):], cache, torch_dtype, build_on,
                                         shard_over)
        if device_map is not None:
            model = dispatch_random(model, device_map)
        source = "random"
    elif shard_over is not None:
        model, tokenizer, source = _load_sharded(spec, cache, torch_dtype, target, revision,
                                                 trust_remote_code, shard_over)
    else:
        model, tokenizer, source = _load_checkpoint(spec, cache, torch_dtype, device_map,
                                                    revision, trust_remote_code)
        if device_map is None:
            model.to(target)
    if device_map is not None:
        check_resident(model)
    model.eval()
    _ensure_pad_token(tokenizer)
    info = _model_info(model, spec, source, torch_dtype, target, device_map)
    if device_map is not None:
        info["hf_device_map"] = {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()}
    return model, tokenizer, info


def _load_checkpoint(spec: str, cache: Path, torch_dtype, device_map, revision,
                     trust_remote_code):
    """(model, tokenizer, source) of a trained model: built-in, .gguf, folder or hub id."""
    if spec in BUILTIN_ALIASES:
        model, tokenizer = _load_pretrained(str(ensure_cache(cache)), torch_dtype, device_map,
                                            None, False)
        return model, tokenizer, "builtin"
    if spec.endswith(".gguf"):
        return (*_load_gguf_file(Path(spec), torch_dtype, device_map), "gguf")
    if os.path.isdir(spec):
        return (*_load_local_folder(Path(spec), torch_dtype, device_map, trust_remote_code),
                "local")
    if _looks_like_path(spec):
        raise UserError(f"model path '{spec}' does not exist; pass a model folder, a .gguf file, "
                        f"a hub id, random:<preset> or omit --model for {BUILTIN_NAME}")
    return (*_load_from_hub(spec, torch_dtype, device_map, revision, trust_remote_code), "hub")


def _load_sharded(spec: str, cache: Path, torch_dtype, target: torch.device, revision,
                  trust_remote_code, shard_over):
    """A trained model under --shard. Rank 0 alone reads the checkpoint, into host memory; every
    rank builds the model on the meta device, shard_over it and receives its rows from rank 0, so no
    device holds the whole model and the files are read once, not once per process. A load
    error on rank 0 is every rank's (exit 2 everywhere, nobody left waiting)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    whole, loaded = None, None
    if shard_over.is_main:
        try:
            whole, tokenizer, source = _load_checkpoint(spec, cache, torch_dtype, None, revision,
                                                        trust_remote_code)
            loaded = (whole.config, tokenizer, source)
        except UserError as error:
            loaded = error
    loaded = shard_over.main_value(loaded)
    if isinstance(loaded, UserError):
        raise loaded
    config, tokenizer, source = loaded
    model = _skeleton(config, torch_dtype, target, shard_over, trust_remote_code)
    set_model_state_dict(model, whole.state_dict() if whole is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, tokenizer, source


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
    # mismatched shapes come back in the loading info rather than as a RuntimeError that only
    # points at a logged table, so that the error can name the weight and both shapes
    model, loading_info = AutoModelForCausalLM.from_pretrained(
        path_or_id, dtype=torch_dtype, device_map=device_map, ignore_mismatched_sizes=True,
        output_loading_info=True, **kwargs)
    check_shapes_match(path_or_id, loading_info["mismatched_keys"])
    return model, tokenizer


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json",
                   "spiece.model", "vocab.txt")


def _load_local_folder(folder: Path, torch_dtype, device_map, trust_remote_code):
    """A Hugging Face model folder: config.json, weights and tokenizer files, checked first so
    that an incomplete folder is named as such."""
    missing = [what for what, present in (
        ("config.json", (folder / "config.json").is_file()),
        ("weights (*.safetensors or *.bin)", any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)),
        ("tokenizer files (tokenizer.json, ...)",
         any((folder / name).is_file() for name in TOKENIZER_FILES))) if not present]
    if missing:
        raise UserError(f"model folder '{folder}' holds no complete model: it lacks "
                        f"{', '.join(missing)}")
    check_weight_files(folder)
    try:
        return _load_pretrained(str(folder), torch_dtype, device_map, None, trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"model folder '{folder}' could not be loaded: {first_line(error)}") \
            from None


def _load_gguf_file(path: Path, torch_dtype, device_map):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise UserError(f"GGUF file '{path}' does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"'{path}' is not a GGUF file (it does not start with the GGUF "
                            f"magic bytes)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch_dtype, device_map=device_map)
    except (struct.error, EOFError, OSError, ValueError, KeyError, IndexError) as error:
        raise UserError(f"GGUF file '{path}' could not be read (truncated or damaged?): "
                        f"{first_line(error)}") from None
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

def _build_random(preset_or_path: str, cache: Path, torch_dtype, target: torch.device,
                  shard_over=None):
    config, tokenizer = random_config(preset_or_path, cache)
    try:
        model = _skeleton(config, torch_dtype, target, shard_over)
        random_init.initialize_(model)
        model.config.pad_token_id = tokenizer.pad_token_id \
            if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    except (ValueError, TypeError, RuntimeError, ArithmeticError, AttributeError) as error:
        raise UserError(f"random:{preset_or_path}: this config does not build a causal LM "
                        f"({type(error).__name__}: {first_line(error)})") from None
    return model, tokenizer


def random_config(preset_or_path: str, cache: Path | None = None):
    """(transformers config, tokenizer) of ``random:<preset_or_path>``."""
    from transformers import AutoConfig

    config_dict = _random_config_dict(preset_or_path)
    tokenizer = builtin_tokenizer(cache or default_cache_dir()) or local_bpe_tokenizer()
    if config_dict.get("vocab_size") is None:
        config_dict["vocab_size"] = len(tokenizer)
    if config_dict["vocab_size"] < len(tokenizer):
        raise UserError(f"random:{preset_or_path}: vocab_size {config_dict['vocab_size']} is "
                        f"smaller than the tokenizer's {len(tokenizer)} tokens")
    for special in ("bos_token_id", "eos_token_id"):  # the tokenizer's, not the architecture's
        config_dict.setdefault(special, getattr(tokenizer, special))
    model_type = config_dict.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, TypeError, RuntimeError, ArithmeticError, AttributeError) as error:
        raise UserError(f"random:{preset_or_path}: this config does not build a causal LM "
                        f"({type(error).__name__}: {first_line(error)})") from None
    # Built without a padding index, so the pad token's embedding row is random like every
    # other row (as a trained model's is), not zero. The pad token is also the document
    # separator: a block starting with a zero embedding keeps an exactly zero state at that
    # position through every layer, where each RMSNorm multiplies the gradient by
    # 1/sqrt(eps) ~ 316; in bfloat16 it overflowed to NaN halfway down llama-3.1-8b.
    config.pad_token_id = None
    return config, tokenizer


def _skeleton(config, torch_dtype, target: torch.device, shard_over=None, trust_remote_code=False):
    """The model with storage for the weights this process holds (all of them unless sharded),
    not yet drawn: built on the meta device, so no weight is initialised twice; buffers (e.g.
    rotary frequencies) keep the values they were built with."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # not done on the meta device; a built model ties them itself
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    if shard_over is not None:
        shard_model(model, shard_over)
    model.to_empty(device=target)
    if shard_over is None:
        model.tie_weights()  # to_empty gives each module its own storage; FSDP keeps them shared
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return model


def _random_config_dict(preset_or_path: str) -> dict:
    if preset_or_path in PRESETS:
        return dict(PRESETS[preset_or_path])
    path = Path(preset_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"random:{preset_or_path}: config file does not exist")
        try:
            config_dict = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"random:{preset_or_path}: not valid JSON ({error})") from None
        _check_random_config(preset_or_path, config_dict)
        return config_dict
    raise UserError(f"unknown random preset '{preset_or_path}'; choose one of "
                    f"{', '.join(PRESETS)} or give a config.json path")


SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "vocab_size", "head_dim", "n_embd",
             "n_layer", "n_head", "n_positions", "n_ctx", "n_inner", "ffn_dim",
             "word_embed_proj_dim")


def _check_random_config(name: str, config_dict) -> None:
    """A config.json for a random model: a JSON object with a known model_type and sizes > 0."""
    from transformers import CONFIG_MAPPING

    if not isinstance(config_dict, dict):
        raise UserError(f"random:{name}: the config must be a JSON object (got "
                        f"{type(config_dict).__name__})")
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str):
        raise UserError(f"random:{name}: the config has no 'model_type' string")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING), n=3)
        raise UserError(f"random:{name}: unknown model_type '{model_type}'"
                        + (f"; close matches: {', '.join(close)}" if close else ""))
    for key in SIZE_KEYS:
        value = config_dict.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise UserError(f"random:{name}: '{key}' must be a positive integer (got {value!r})")


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
