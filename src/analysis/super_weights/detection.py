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
from src.distributed.ranks import Ranks
from src.distributed.sharding import local, without_grad

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
        self.spike_batch = None  # the batch of the spike: ties go to the earliest, as in one pass

    def __call__(self, module, inputs, output):
        if self.batch_state.get("index", 0) is None:  # a --shard padding step: not data
            return
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
            self.spike_batch = torch.zeros((), dtype=torch.long, device=y.device)
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
        self.spike_batch = torch.where(better, self.batch_state.get("index", 0),
                                       self.spike_batch)


def detect(model, targets: list[Target], blocks: TokenBlocks, batch_size: int,
           threshold: float = SPIKE_THRESHOLD, layout=None) -> list[dict]:
    """One forward pass over ``blocks``; per hooked layer the activation peaks (module docstring).
    ``layout`` (sharding.Layout of the targets' weights) under --shard: each rank runs its share
    of the batches and the peaks are merged over the ranks."""
    ranks = layout.ranks if layout is not None else Ranks()
    batch_state: dict = {}
    recorders = [_PeakRecorder(batch_state) for _ in targets]
    handles = [t.module.register_forward_hook(r) for t, r in zip(targets, recorders)]
    device = input_device(model)
    try:
        with without_grad(ranks.sharded):
            for index in ranks.my_batches(math.ceil(len(blocks) / batch_size)):
                input_ids, attention_mask = blocks.batch(index or 0, batch_size, device)
                batch_state["mask"], batch_state["index"] = attention_mask, index
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if ranks.distributed:
        _merge_over_ranks(recorders, targets, ranks)
    coordinates = [(int(r.spike_row), int(r.x_peak.argmax())) for r in recorders]
    flat = [from_out_in(t.meta, row, col) for t, (row, col) in zip(targets, coordinates)]
    weights = _weights_at(targets, flat, layout)
    layers = [_layer_summary(t, r, i, w) for t, r, i, w in zip(targets, recorders, flat, weights)]
    for key in ("input", "output"):
        median_max = float(torch.tensor([layer[f"{key}_max"] for layer in layers]).median())
        for layer in layers:
            layer[f"{key}_ratio_across_layers"] = _ratio(layer[f"{key}_max"], median_max)
    for layer in layers:
        layer["spike"] = layer["output_ratio"] >= threshold
    return layers


def _merge_over_ranks(recorders: list[_PeakRecorder], targets: list[Target], ranks) -> None:
    """Every rank's recorders become the merge of all ranks': peaks by maximum, the spike from
    the rank with the largest, ties to the earliest batch (the rank holding the lowest index)."""
    for recorder, target in zip(recorders, targets):
        if recorder.x_peak is None:  # this rank ran padding steps only
            n_out, n_in = target.meta.shape_out_in
            recorder.x_peak = torch.zeros(n_in, device=ranks.device)
            recorder.y_peak = torch.zeros(n_out, device=ranks.device)
    peaks = [torch.cat([r.x_peak, r.y_peak]).to(ranks.device) for r in recorders]
    ranks.max_(peaks)
    mine = [None if r.spike_value is None else
            (float(r.spike_value), -int(r.spike_batch), int(r.spike_row), float(r.spike_y),
             r.spike_x.cpu()) for r in recorders]
    every = ranks.all_gather_objects(mine)
    for i, (recorder, peak) in enumerate(zip(recorders, peaks)):
        n_in = recorder.x_peak.numel()
        recorder.x_peak, recorder.y_peak = peak[:n_in], peak[n_in:]
        value, _, row, spike_y, spike_x = max(part[i] for part in every if part[i] is not None)[:5]
        recorder.spike_value, recorder.spike_row = torch.tensor(value), torch.tensor(row)
        recorder.spike_y, recorder.spike_x = torch.tensor(spike_y), spike_x


def _weights_at(targets: list[Target], flat: list[int], layout) -> list[float]:
    """The weight at flat index ``flat[i]`` of each target (read from its rank under --shard)."""
    if layout is None:
        return [float(t.param.detach().reshape(-1)[i]) for t, i in zip(targets, flat)]
    values = layout.values_at({t.param_name: (local(t.param), torch.tensor([i]))
                               for t, i in zip(targets, flat)})
    return [float(values[t.param_name][0]) for t in targets]


def _layer_summary(target: Target, recorder: _PeakRecorder, flat_index: int,
                   weight: float) -> dict:
    x_peak, y_peak = recorder.x_peak.cpu(), recorder.y_peak.cpu()
    row, col = int(recorder.spike_row), int(x_peak.argmax())
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
                    progress: bool = False, layout=None) -> tuple[list[dict], list[list[dict]]]:
    """Iterative detection: (candidates in the order found, per-layer summaries of each pass);
    ``layout`` (sharding.Layout of the targets' weights) under --shard."""
    params = {t.param_name: t.param for t in targets}
    candidates: list[dict] = []
    passes: list[list[dict]] = []
    with tqdm(total=max_weights + 1, desc="super-weight detection", disable=not progress,
              leave=False) as bar:
        while True:
            with perturbed(params, candidate_selection(candidates), "zero", layout=layout):
                layers = detect(model, targets, blocks, batch_size, threshold, layout)
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
