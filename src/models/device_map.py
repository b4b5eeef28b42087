"""--device-map: one model spread over several devices (or checked onto one) with accelerate.

A strategy name (auto, balanced, balanced_low_0, sequential) or a JSON file mapping module names
to a GPU index, "cuda:N" or "cpu". Weights offloaded to disk or the meta device are refused:
scoring and perturbation need every weight resident.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from src.errors import UserError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(device_map):
    """--device-map value -> what accelerate/transformers take: None, a strategy name, or a dict
    module name -> device read from a JSON file (GPU index, "cuda:N" or "cpu")."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    if device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    path = Path(device_map)
    if path.suffix != ".json" and not path.is_file():
        raise UserError(f"bad --device-map '{device_map}': use {', '.join(DEVICE_MAP_STRATEGIES)} "
                        f"or a JSON file mapping module names to devices")
    if not path.is_file():
        raise UserError(f"--device-map file '{device_map}' does not exist")
    try:
        mapping = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--device-map file '{device_map}' is not valid JSON ({error})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"--device-map file '{device_map}' must hold a JSON object: module name "
                        f"-> device (GPU index, \"cuda:N\" or \"cpu\")")
    for module, where in mapping.items():
        _check_map_device(module, where)
    return mapping


def _check_map_device(module: str, where) -> None:
    if where == "disk":
        raise UserError(f"--device-map puts '{module}' on disk: scoring and perturbation need every "
                        f"weight in memory; map it to a GPU or the CPU")
    if where == "cpu":
        return
    index = where if isinstance(where, int) and not isinstance(where, bool) else None
    if isinstance(where, str) and where.isdigit():
        index = int(where)
    if isinstance(where, str) and where.startswith("cuda"):
        index = int(where.split(":")[1]) if ":" in where and where.split(":")[1].isdigit() else 0
    if index is None:
        raise UserError(f"--device-map: bad device {where!r} for '{module}'; use a GPU index, "
                        f"\"cuda:N\" or \"cpu\"")
    if index >= torch.cuda.device_count():
        raise UserError(f"--device-map puts '{module}' on GPU {index}, but "
                        f"{torch.cuda.device_count()} GPU(s) are visible")


def dispatch_random(model, device_map):
    """Spread a model built on the CPU over devices with accelerate: a strategy name is turned
    into a map by infer_auto_device_map (balanced by available memory unless "sequential")."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        kwargs = {"no_split_module_classes": getattr(model, "_no_split_modules", None) or None,
                  "dtype": next(model.parameters()).dtype}
        if device_map != "sequential":
            kwargs["max_memory"] = get_balanced_memory(
                model, low_zero=device_map == "balanced_low_0", **kwargs)
        device_map = infer_auto_device_map(model, **kwargs)
        for module, where in device_map.items():
            _check_map_device(module, where)
    quiet = logging.getLogger("accelerate.big_modeling")  # its "offloaded to the cpu" note is
    level = quiet.level                                    # wrong for an all-CPU map; checked
    quiet.setLevel(logging.ERROR)                          # by check_resident instead
    try:
        model = dispatch_model(model, device_map=device_map, force_hooks=True)
    except ValueError as error:  # e.g. a map that leaves some modules out
        raise UserError(f"--device-map does not fit this model: {error}") from None
    finally:
        quiet.setLevel(level)
    model.hf_device_map = dict(device_map)
    return model


def check_resident(model) -> None:
    """Every parameter must live on a device: accelerate's offloading (weights on "meta",
    streamed in per forward) leaves nothing to score, perturb or restore."""
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise UserError(f"--device-map offloaded {len(offloaded)} parameter tensors (e.g. "
                        f"{offloaded[0]}) to CPU/disk: scoring and perturbation need resident "
                        f"weights; give more GPU memory, a smaller --dtype, or a map that puts "
                        f"every module on a GPU (or run on the CPU)")
