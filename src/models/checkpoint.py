"""The weights files of a local model folder, checked before Hugging Face loads them.

Weights whose shapes do not fit the config are named by ``check_shapes_match``. A corrupt,
truncated or missing weights file makes the loader deep inside transformers raise an
error that names no file (safetensors' ``SafetensorError``, ``torch.load``'s ``UnpicklingError``
or ``RuntimeError``). ``check_weight_files`` opens each file the folder's checkpoint is made of,
the way transformers picks them, reading headers only (safetensors' header, ``torch.load`` onto
the meta device), and turns the first problem into a one-line ``UserError`` naming the file.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from src.errors import UserError, first_line

# transformers' order of preference for a local folder (modeling_utils, from_pretrained):
# (single file, index of a sharded checkpoint), safetensors first
CHECKPOINT_NAMES = (("model.safetensors", "model.safetensors.index.json"),
                    ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def check_weight_files(folder: Path) -> None:
    """UserError naming the first weights file of ``folder``'s checkpoint that is missing or
    cannot be read; nothing when the folder has none of the names transformers looks for
    (transformers then says so itself)."""
    for weights in checkpoint_files(folder):
        _check_readable(weights)


def checkpoint_files(folder: Path) -> list[Path]:
    """The weights files transformers reads for ``folder``: one file, or the shards its index
    names (UserError when the index names a shard that is not there)."""
    for single, index in CHECKPOINT_NAMES:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return _shards_named_by(folder / index)
    return []


def _shards_named_by(index: Path) -> list[Path]:
    try:
        index_data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"checkpoint index '{index}' cannot be read "
                        f"({type(error).__name__}: {first_line(error)})") from None
    weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str)
                                                   for name in weight_map.values()):
        raise UserError(f"checkpoint index '{index}' has no 'weight_map' of tensor names to "
                        f"shard file names")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        others = f" (and {len(missing) - 1} more shard(s))" if len(missing) > 1 else ""
        raise UserError(f"checkpoint index '{index}' names shard '{missing[0]}', which is "
                        f"missing{others}; copy every shard into the folder")
    return shards


def _check_readable(weights: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        if weights.suffix == ".safetensors":
            with safe_open(str(weights), framework="pt"):
                pass  # opening parses the header and checks that the data covers the file
        else:
            torch.load(weights, map_location="meta", weights_only=True)
    except SafetensorError as error:
        raise UserError(f"weights file '{weights}' is corrupt or truncated: not a readable "
                        f"safetensors file ({first_line(error)})") from None
    except pickle.UnpicklingError:
        raise UserError(f"weights file '{weights}' cannot be read by torch.load: corrupt, or "
                        f"holding objects other than tensors") from None
    except Exception as error:  # garbage bytes reach the unpickler's asserts, lookups, ...
        raise UserError(f"weights file '{weights}' cannot be read by torch.load: corrupt or "
                        f"truncated ({type(error).__name__}: {first_line(error)})") from None


def check_shapes_match(path_or_id, mismatched_keys) -> None:
    """UserError naming a weight whose shape in the checkpoint is not the one its config gives.

    ``mismatched_keys`` holds transformers' (name, shape in the checkpoint, shape in the model)."""
    if not mismatched_keys:
        return
    name, saved, expected = min(mismatched_keys)
    others = f" (and {len(mismatched_keys) - 1} more weight(s))" if len(mismatched_keys) > 1 else ""
    raise UserError(f"the weights of model '{path_or_id}' do not fit its config.json: '{name}' "
                    f"is {tuple(saved)} in the checkpoint but {tuple(expected)} by the "
                    f"config{others}")
