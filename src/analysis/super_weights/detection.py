"""Super-weight detection: activation peaks at every block's MLP output projection, and the
iterative search for candidates (see the package docstring)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from src.data.loading import TokenBlocks
from src.errors import UserError
from src.models.components import (ParamMeta, component_of, describe_parameters, from_out_in,
                                   layer_index)
from src.models.properties import input_device
from src.sensitivity.perturb import perturbed
from src.sensitivity.rank import Selection

SPIKE_THRESHOLD = 100.0   # output_ratio at or above which a layer spikes
MAX_WEIGHTS = 5           # default number of candidates searched for


@dataclass(frozen=True)
class Target:
    """One hooked MLP output projection."""
    module_name: str
    module: torch.nn.Module
    param: torch.nn.Parameter
    meta: ParamMeta

    @property
    def param_name(self) -> str:
        return self.meta.name


def mlp_down_targets(model) -> list[Target]:
    """Every block's MLP output projection weight, in model order (via components.py)."""
    names = [name for name, p in model.named_parameters()
             if name.endswith(".weight") and p.ndim == 2 and component_of(name) == "mlp_down"
             and layer_index(name) is not None]
    if not names:
        raise UserError("super-weight search: found no MLP output projection (down_proj, "
                        "mlp.c_proj, dense_4h_to_h, fc2) in this model")
    metas = describe_parameters(model, names)
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    return [Target(name.rsplit(".", 1)[0], modules[name.rsplit(".", 1)[0]], params[name], metas[name])
            for name in names]


# ----------------------------------------------------------------------------- detection

class _PeakRecorder:
    """Forward hook: running per-channel peaks of |input| and |output| over real tokens, and the
    input vector at the token of the overall output peak. Everything stays on the module's
    device; nothing is synchronised per batch."""

    def __init__(self, batch_state: dict):
        self.batch_state = batch_state
        self.x_peak = self.y_peak = None
        self.spike_value = self.spike_row = self.spike_y = self.spike_x = None

    def __call__(self, module, inputs, output):
        x = inputs[0].detach()
        y = output.detach()
        x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        x_abs, y_abs = x.abs(), y.abs()
        mask = self.batch_state["mask"].reshape(-1).to(x.device).bool()
        if mask.numel() == x.shape[0] == y.shape[0]:  # else routed tokens (MoE): keep all
            x_abs = torch.where(mask[:, None], x_abs, 0.0)
            y_abs = torch.where(mask[:, None], y_abs, 0.0)
        if self.x_peak is None:
            self.x_peak, self.y_peak = x_abs.amax(0), y_abs.amax(0)
            self.spike_value = torch.zeros((), device=y.device)
            self.spike_row = torch.zeros((), dtype=torch.long, device=y.device)
            self.spike_y = torch.zeros((), device=y.device)
            self.spike_x = torch.zeros(x.shape[-1], device=x.device)
        else:
            self.x_peak = torch.maximum(self.x_peak, x_abs.amax(0))
            self.y_peak = torch.maximum(self.y_peak, y_abs.amax(0))
        flat = y_abs.reshape(-1).argmax()
        token, row = flat // y.shape[-1], flat % y.shape[-1]
        better = y_abs.reshape(-1)[flat] > self.spike_value
        self.spike_value = torch.where(better, y_abs.reshape(-1)[flat], self.spike_value)
        self.spike_row = torch.where(better, row, self.spike_row)
        self.spike_y = torch.where(better, y[token, row], self.spike_y)
        self.spike_x = torch.where(better, x[token], self.spike_x)


@torch.inference_mode()
def detect(model, targets: list[Target], blocks: TokenBlocks, batch_size: int,
           threshold: float = SPIKE_THRESHOLD) -> list[dict]:
    """One forward pass over ``blocks``; per hooked layer the activation peaks (module docstring)."""
    batch_state: dict = {}
    recorders = [_PeakRecorder(batch_state) for _ in targets]
    handles = [t.module.register_forward_hook(r) for t, r in zip(targets, recorders)]
    try:
        for input_ids, attention_mask in blocks.batches(batch_size, input_device(model)):
            batch_state["mask"] = attention_mask
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    layers = [_layer_summary(t, r) for t, r in zip(targets, recorders)]
    for key in ("input", "output"):
        median_max = float(torch.tensor([layer[f"{key}_max"] for layer in layers]).median())
        for layer in layers:
            layer[f"{key}_ratio_across_layers"] = _ratio(layer[f"{key}_max"], median_max)
    for layer in layers:
        layer["spike"] = layer["output_ratio"] >= threshold
    return layers


def _layer_summary(target: Target, recorder: _PeakRecorder) -> dict:
    x_peak, y_peak = recorder.x_peak.cpu(), recorder.y_peak.cpu()
    row, col = int(recorder.spike_row), int(x_peak.argmax())
    flat_index = from_out_in(target.meta, row, col)
    weight = float(target.param.detach().reshape(-1)[flat_index])
    spike_y = float(recorder.spike_y)
    share = weight * float(recorder.spike_x[col]) / spike_y if spike_y != 0 else None
    return {"layer": target.meta.layer, "module": target.module_name,
            "parameter": target.param_name,
            "input_max": float(x_peak[col]), "input_channel": col,
            "input_ratio": _ratio(float(x_peak[col]), float(x_peak.median())),
            "output_max": float(recorder.spike_value), "output_channel": row,
            "output_ratio": _ratio(float(recorder.spike_value), float(y_peak.median())),
            "weight_value": weight, "flat_index": flat_index, "spike_share": share}


def _ratio(value: float, reference: float) -> float:
    """value / reference; inf for a positive value over a zero reference, 0 for 0 / 0."""
    if reference > 0:
        return value / reference
    return math.inf if value > 0 else 0.0


def find_candidates(model, targets: list[Target], blocks: TokenBlocks, batch_size: int,
                    threshold: float = SPIKE_THRESHOLD, max_weights: int = MAX_WEIGHTS,
                    progress: bool = False) -> tuple[list[dict], list[list[dict]]]:
    """Iterative detection: (candidates in the order found, per-layer summaries of each pass)."""
    params = {t.param_name: t.param for t in targets}
    candidates: list[dict] = []
    passes: list[list[dict]] = []
    with tqdm(total=max_weights + 1, desc="super-weight detection", disable=not progress,
              leave=False) as bar:
        while True:
            with perturbed(params, candidate_selection(candidates), "zero"):
                layers = detect(model, targets, blocks, batch_size, threshold)
            passes.append(layers)
            bar.update()
            found = _next_candidate(layers, candidates)
            if len(candidates) >= max_weights or found is None:
                return candidates, passes
            candidates.append(found | {"found_in_pass": len(passes) - 1})


def _next_candidate(layers: list[dict], candidates: list[dict]) -> dict | None:
    taken = {(c["parameter"], c["flat_index"]) for c in candidates}
    fresh = [layer for layer in layers
             if layer["spike"] and (layer["parameter"], layer["flat_index"]) not in taken]
    if not fresh:
        return None
    best = max(fresh, key=lambda layer: layer["output_ratio"])  # first of equals: earlier layer
    return {"parameter": best["parameter"], "module": best["module"], "layer": best["layer"],
            "row": best["output_channel"], "col": best["input_channel"],
            "flat_index": best["flat_index"], "value": best["weight_value"],
            "input_activation": best["input_max"], "input_ratio": best["input_ratio"],
            "output_activation": best["output_max"], "output_ratio": best["output_ratio"],
            "spike_share": best["spike_share"]}


def candidate_selection(candidates: list[dict]) -> Selection:
    """Selection (name -> flat indices into the stored tensor) of the given candidates."""
    by_name: dict[str, list[int]] = {}
    for c in candidates:
        by_name.setdefault(c["parameter"], []).append(c["flat_index"])
    return {name: torch.tensor(sorted(idx), dtype=torch.long) for name, idx in by_name.items()}
