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


def weight_record(model, name: str, flat_index: int) -> dict:
    meta = describe_parameters(model, [name])[name]
    row, col = (int(v) for v in to_out_in(meta, torch.tensor([flat_index])))
    value = dict(model.named_parameters())[name].detach().reshape(-1)[flat_index]
    channel = col if meta.component in EMBEDDINGS else row
    return {"parameter": name, "row": row, "col": col, "flat_index": int(flat_index),
            "value": float(value), "layer": meta.layer, "component": meta.component,
            "module": name.rsplit(".", 1)[0], "channel": channel}


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
    return [weight_record(model, c["parameter"], c["flat_index"])
            for c in section.get("candidates", [])]


def from_top_k(model, scores, k: int, n_weights: int) -> list[dict]:
    """The run's global top-K weights by |score|, the strongest first (at most ``n_weights``
    of them: the single sources; the whole set is ``from_selection``)."""
    chosen = top_k(scores, k, "global")
    ranked = sorted(((float(scores[n].reshape(-1)[i].abs()), n, int(i))
                     for n, idx in chosen.items() for i in idx), reverse=True)
    return [weight_record(model, name, index) for _, name, index in ranked[:n_weights]]


def selection_weights(model, scores, k: int) -> list[dict]:
    chosen = top_k(scores, k, "global")
    return [weight_record(model, name, int(i)) for name, idx in chosen.items() for i in idx]


def sources(model, super_section: dict | None, scores, k: int,
            n_weights: int) -> tuple[str, list[Source], Source | None]:
    """(where the sources come from, the single-weight sources, the whole set or None)."""
    if super_section is not None:
        whole = from_super_weights(model, super_section)
        weights, origin = whole[:n_weights], "super_weights"
    else:
        weights = from_top_k(model, scores, k, n_weights)
        origin = "top_k"
        whole = selection_weights(model, scores, k)
    singles = [source_of([w], short_label(w)) for w in weights]
    if len(whole) > 1:
        return origin, singles, source_of(whole, f"all {len(whole)} weights")
    return origin, singles, None
