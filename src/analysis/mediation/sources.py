"""What --mediation explains: sources (weights that are zeroed) and the output channels they feed.

A weight W[row, col] (in [out, in] coordinates) of a linear layer feeds output channel ``row`` of
its module; an embedding weight E[token, d] feeds channel ``d``; a 1-D weight (norm, bias) feeds
the channel of its own index. A weight of an MLP output projection or an attention output
projection writes its channel straight into the residual stream (``residual_channel``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from src.models.components import describe_parameters, to_out_in
from src.sensitivity.rank import Selection, top_k

RESIDUAL_WRITERS = ("mlp_down", "attn_o")
EMBEDDINGS = ("embedding", "pos_embedding")


@dataclass(frozen=True)
class Source:
    label: str
    selection: Selection               # parameter name -> flat indices (the zeroed weights)
    channels: dict[str, list[int]]     # module name -> output channels the weights feed
    layer: int | None                  # first decoder block it sits in (None: before them all)
    residual_channel: int | None       # a single residual writer: the channel it writes
    weights: tuple[dict, ...]          # parameter, row, col, flat_index, value

    @property
    def single(self) -> bool:
        return len(self.weights) == 1

    def describe(self) -> dict:
        return {"label": self.label, "layer": self.layer, "weights": list(self.weights),
                "channels": self.channels, "residual_channel": self.residual_channel}


def weight_records(model, selection: dict[str, list[int]]) -> dict[tuple[str, int], dict]:
    """(parameter, flat index) -> its record, for every selected weight: one tensor read and
    one coordinate conversion per tensor."""
    metas = describe_parameters(model, list(selection))
    params = dict(model.named_parameters())
    records = {}
    for name, indices in selection.items():
        meta, flat = metas[name], torch.as_tensor(indices, dtype=torch.long)
        rows, cols = to_out_in(meta, flat)
        values = params[name].detach().reshape(-1)[flat.to(params[name].device)].float().cpu()
        channels = cols if meta.component in EMBEDDINGS else rows
        for i, row, col, value, channel in zip(flat.tolist(), rows.tolist(), cols.tolist(),
                                               values.tolist(), channels.tolist()):
            records[name, i] = {"parameter": name, "row": row, "col": col, "flat_index": i,
                                "value": value, "layer": meta.layer,
                                "component": meta.component, "module": name.rsplit(".", 1)[0],
                                "channel": channel}
    return records


def source_of(weights: list[dict], label: str) -> Source:
    selection: dict[str, list[int]] = {}
    channels: dict[str, list[int]] = {}
    for w in weights:
        selection.setdefault(w["parameter"], []).append(w["flat_index"])
        feeds = channels.setdefault(w["module"], [])
        if w["channel"] not in feeds:
            feeds.append(w["channel"])
    layers = [w["layer"] for w in weights]
    (only,) = weights if len(weights) == 1 else (None,)
    residual = only["channel"] if only and only["component"] in RESIDUAL_WRITERS else None
    return Source(label, {n: torch.tensor(sorted(i)) for n, i in selection.items()},
                  {m: sorted(c) for m, c in channels.items()},
                  None if None in layers else min(layers), residual, tuple(weights))


def short_label(w: dict) -> str:
    module = w["module"].rsplit(".", 1)[-1]
    where = f"L{w['layer']} " if w["layer"] is not None else ""
    return f"{where}{module}[{w['row']},{w['col']}]"


def from_super_weights(model, section: dict) -> list[dict]:
    keys = [(c["parameter"], c["flat_index"]) for c in section.get("candidates", [])]
    selection: dict[str, list[int]] = {}
    for name, index in keys:
        selection.setdefault(name, []).append(index)
    records = weight_records(model, selection)
    return [records[key] for key in keys]


def from_top_k(model, scores, k: int) -> list[dict]:
    """The run's global top-K weights, the largest |score| first (ties: parameter, index)."""
    chosen = top_k(scores, k, "global")
    records = weight_records(model, {n: idx.tolist() for n, idx in chosen.items()})
    strength = {key: s for n, idx in chosen.items()
                for key, s in zip(((n, i) for i in idx.tolist()),
                                  scores[n].reshape(-1)[idx.to(scores[n].device)].abs().tolist())}
    return [records[key] for key in sorted(records, key=lambda key: (-strength[key], key))]


def sources(model, super_section: dict | None, scores, k: int,
            n_weights: int) -> tuple[str, list[Source], Source | None]:
    """(where the sources come from, the single-weight sources, the whole set or None)."""
    if super_section is not None:
        whole = from_super_weights(model, super_section)
        weights, origin = whole[:n_weights], "super_weights"
    else:
        whole = from_top_k(model, scores, k)
        weights, origin = whole[:n_weights], "top_k"
    singles = [source_of([w], short_label(w)) for w in weights]
    if len(whole) > 1:
        return origin, singles, source_of(whole, f"all {len(whole)} weights")
    return origin, singles, None
