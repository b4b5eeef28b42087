"""Rank scored weights: top-K, bottom-K and random-K selections.

``Selection = dict[str, LongTensor]``: parameter name -> flat indices into the stored parameter,
in rank order. Ranking is by |score| (signed metrics such as hutchinson_diag keep their sign in
the outputs). Ties are broken deterministically: earlier parameter (in model order), then lower
flat index.

Modes: ``per_layer`` takes K per weight tensor; ``global`` takes the exact top-K over all scored
weights as a merge of per-tensor top-K candidates, so memory stays O(tensors x K).
"""
from __future__ import annotations

import pandas as pd
import torch

from src.errors import UserError
from src.models.components import ParamMeta, to_out_in

Selection = dict[str, torch.Tensor]
MODES = ("per_layer", "global")


def check_k(scores_or_sizes: dict, k: int, mode: str) -> None:
    sizes = {n: (v.numel() if isinstance(v, torch.Tensor) else int(v))
             for n, v in scores_or_sizes.items()}
    if mode not in MODES:
        raise UserError(f"bad --mode '{mode}': use per_layer or global")
    if k < 1:
        raise UserError(f"--topk must be at least 1 (got {k})")
    limit = min(sizes.values()) if mode == "per_layer" else sum(sizes.values())
    if k > limit:
        where = "the smallest scored tensor" if mode == "per_layer" else "all scored weights"
        raise UserError(f"--topk {k} is larger than {where} ({limit} weights) in {mode} mode")


def _tensor_top(key: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest entries of ``key``, ties -> lower index, sorted by rank."""
    flat = key.reshape(-1)
    kth_value = torch.topk(flat, k, sorted=True).values[-1]
    above = torch.nonzero(flat > kth_value).squeeze(1)
    tied = torch.nonzero(flat == kth_value).squeeze(1)[: k - above.numel()]
    chosen = torch.cat([above, tied])  # ascending index within each part
    chosen = chosen.sort().values
    order = torch.sort(flat[chosen], descending=True, stable=True).indices
    return chosen[order]


def _rank_key(score: torch.Tensor, largest: bool) -> torch.Tensor:
    key = score.detach().float().abs()
    return key if largest else -key


def _select(scores: dict[str, torch.Tensor], k: int, mode: str, largest: bool) -> Selection:
    check_k(scores, k, mode)
    per_tensor = {name: _tensor_top(_rank_key(s, largest), min(k, s.numel()))
                  for name, s in scores.items()}
    if mode == "per_layer":
        return per_tensor
    return _merge_global(scores, per_tensor, k, largest)


def _merge_global(scores, per_tensor: Selection, k: int, largest: bool) -> Selection:
    names = list(per_tensor)
    keys, owner, index = [], [], []
    for position, name in enumerate(names):
        idx = per_tensor[name]
        order = idx.sort().values  # ascending index: makes the stable sort break ties by index
        keys.append(_rank_key(scores[name], largest).reshape(-1)[order].cpu())
        owner.append(torch.full((order.numel(),), position, dtype=torch.long))
        index.append(order.cpu())
    keys, owner, index = torch.cat(keys), torch.cat(owner), torch.cat(index)
    ranked = torch.sort(keys, descending=True, stable=True).indices[:k]
    selection: Selection = {}
    for position, name in enumerate(names):
        mine = ranked[owner[ranked] == position]
        if mine.numel():
            device = scores[name].device
            selection[name] = index[mine].to(device)
    return selection


def top_k(scores, k: int, mode: str) -> Selection:
    return _select(scores, k, mode, largest=True)


def bottom_k(scores, k: int, mode: str) -> Selection:
    return _select(scores, k, mode, largest=False)


def random_k(sizes: dict[str, int], k: int, mode: str, seed: int) -> Selection:
    """K weights drawn uniformly without replacement, from the same eligible set and mode.

    ``sizes``: parameter name -> numel. Indices are returned on CPU, sorted ascending.
    """
    check_k(sizes, k, mode)
    generator = torch.Generator().manual_seed(seed)
    if mode == "per_layer":
        return {name: _sample_without_replacement(n, k, generator) for name, n in sizes.items()}
    names = list(sizes)
    offsets = torch.tensor([0] + [sizes[n] for n in names]).cumsum(0)
    picks = _sample_without_replacement(int(offsets[-1]), k, generator)
    owner = torch.bucketize(picks, offsets[1:], right=True)
    return {name: picks[owner == i] - offsets[i] for i, name in enumerate(names)
            if bool((owner == i).any())}


def _sample_without_replacement(population: int, k: int, generator) -> torch.Tensor:
    """k distinct integers in [0, population), uniformly; never materialises the population."""
    if population <= 4 * k or population <= 1_000_000:
        return torch.randperm(population, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        draw = torch.randint(population, (2 * k,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    keep = torch.randperm(chosen.numel(), generator=generator)[:k]
    return chosen[keep].sort().values


def selection_size(selection: Selection) -> int:
    return sum(int(idx.numel()) for idx in selection.values())


def selection_table(selection: Selection, scores, params, metas: dict[str, ParamMeta],
                    mode: str) -> pd.DataFrame:
    """One row per selected weight: rank, parameter, layer, component, row, col, flat_index,
    score (signed), value. row/col use the [out, in] convention; rank is global in global mode
    and within the tensor in per_layer mode."""
    frames = []
    order_of = {name: i for i, name in enumerate(scores)}
    for name, idx in selection.items():
        idx_cpu = idx.cpu()
        meta = metas[name]
        rows, cols = to_out_in(meta, idx_cpu)
        frames.append(pd.DataFrame({
            "parameter": name, "layer": meta.layer if meta.layer is not None else -1,
            "component": meta.component, "row": rows.numpy(), "col": cols.numpy(),
            "flat_index": idx_cpu.numpy(),
            "score": scores[name].reshape(-1)[idx].float().cpu().numpy(),
            "value": params[name].detach().reshape(-1)[idx].float().cpu().numpy(),
            "_order": order_of[name],
        }))
    table = pd.concat(frames, ignore_index=True)
    table["_key"] = table["score"].abs()
    table = table.sort_values(["_key", "_order", "flat_index"], ascending=[False, True, True],
                              kind="mergesort")
    if mode == "global":
        table.insert(0, "rank", range(1, len(table) + 1))
    else:
        table.insert(0, "rank", table.groupby("parameter").cumcount() + 1)
        table = table.sort_values(["_order", "rank"], kind="mergesort")
    return table.drop(columns=["_key", "_order"]).reset_index(drop=True)
