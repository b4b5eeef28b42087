"""Rank scored weights: top-K, bottom-K and random-K selections.

``Selection = dict[str, LongTensor]``: parameter name -> flat indices into the stored parameter,
in rank order. Ranking is by |score| (signed metrics such as hutchinson_diag keep their sign in
the outputs). Ties are broken deterministically: earlier parameter (in model order), then lower
flat index.

Modes: ``per_tensor`` takes K per weight tensor; ``global`` takes the exact top-K over all scored
weights as a merge of per-tensor top-K candidates, so memory stays O(tensors x K).
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from src.errors import UserError
from src.models.components import ParamMeta, to_out_in
from src.distributed.sharding import local

Selection = dict[str, torch.Tensor]
MODES = ("per_tensor", "global")


def max_k(sizes: dict[str, int], mode: str) -> int:
    """Largest K a mode allows: the smallest tensor (per_tensor) or all weights (global)."""
    return min(sizes.values()) if mode == "per_tensor" else sum(sizes.values())


def check_k(scores_or_sizes: dict, k: int, mode: str) -> None:
    sizes = {n: (v.numel() if isinstance(v, torch.Tensor) else int(v))
             for n, v in scores_or_sizes.items()}
    if mode not in MODES:
        raise UserError(f"bad ranking mode '{mode}': use {' or '.join(MODES)}")
    if k < 1:
        raise UserError(f"K must be at least 1 (got {k})")
    limit = max_k(sizes, mode)
    if k > limit:
        where = "the smallest scored tensor" if mode == "per_tensor" else "all scored weights"
        raise UserError(f"K={k} is larger than {where} ({limit} weights) in {mode} mode")


def _exact_tensor_top(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, keys) of the k largest entries in ascending index order; exact under ties
    (scans the tensor for entries equal to the k-th value)."""
    kth_value = torch.topk(flat, k, sorted=True).values[-1]
    above = torch.nonzero(flat > kth_value).squeeze(1)
    tied = torch.nonzero(flat == kth_value).squeeze(1)[: k - above.numel()]
    chosen = torch.cat([above, tied]).sort().values
    return chosen, flat[chosen]


def _candidates(scores: dict[str, torch.Tensor], k: int, largest: bool, eligible=None):
    """Per tensor: (indices ascending, rank keys) of its top-min(k, numel) entries by rank key
    (|score|, negated for bottom-K). One topk per tensor and one host sync for all tensors; a
    tensor whose k-th and (k+1)-th keys tie is redone exactly. ``eligible`` (name -> bool mask,
    bottom-K only): weights outside the mask rank after every eligible one."""
    picks, boundary_ties = {}, []
    for name in scores:
        magnitude = _rank_key(scores, name, eligible)
        n = min(k, magnitude.numel())
        values, index = torch.topk(magnitude, min(n + 1, magnitude.numel()), largest=largest,
                                   sorted=True)
        tie = values[n - 1] == values[n] if values.numel() > n else torch.zeros((), dtype=torch.bool,
                                                                               device=values.device)
        boundary_ties.append(tie.to("cpu", non_blocking=True))
        index, order = index[:n].sort()
        picks[name] = (index, values[:n][order])
    synchronize_all(scores)
    result = {}
    for (name, (index, values)), tie in zip(picks.items(), boundary_ties):
        if bool(tie):
            key = _rank_key(scores, name, eligible)
            key = key if largest else key.neg_()
            index, values = _exact_tensor_top(key, index.numel())
            values = values.abs()
        result[name] = (index, values if largest else -values)
    return result


def _rank_key(scores, name: str, eligible) -> torch.Tensor:
    """|score| as a flat float32 tensor; +inf where ``eligible`` rules a weight out."""
    magnitude = scores[name].detach().reshape(-1).float().abs()  # a new tensor: abs copies
    if eligible is not None:
        magnitude.masked_fill_(~eligible(name).reshape(-1).to(magnitude.device), math.inf)
    return magnitude


def synchronize_all(tensors: dict) -> None:
    """Wait for every CUDA device that holds one of ``tensors`` (non-blocking copies landed)."""
    for device in {t.device for t in tensors.values() if t.device.type == "cuda"}:
        torch.cuda.synchronize(device)


def _in_rank_order(index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``index`` (ascending) reordered by key descending; the stable sort keeps lower index first."""
    return index[torch.sort(keys, descending=True, stable=True).indices]


def _select(scores: dict[str, torch.Tensor], k: int, mode: str, largest: bool,
            layout=None, eligible=None) -> Selection:
    check_k(scores if layout is None else {n: layout.numel[n] for n in scores}, k, mode)
    candidates = _candidates(scores, k, largest, eligible)
    if layout is not None:
        candidates = _union_over_ranks(candidates, layout, k)
    if mode == "per_tensor":
        return {name: _in_rank_order(index, keys) for name, (index, keys) in candidates.items()}
    return _merge_global(scores, candidates, k)


def _merge_global(scores, candidates: dict, k: int) -> Selection:
    """Exact global top-k from per-tensor candidates: sort all candidate keys at once (on the
    first tensor's device); candidates are laid out in (tensor order, index ascending), so the
    stable sort breaks ties by earlier tensor, then lower index."""
    names = list(candidates)
    device = candidates[names[0]][0].device
    keys = torch.cat([candidates[n][1].to(device) for n in names])
    index = torch.cat([candidates[n][0].to(device) for n in names])
    owner = torch.cat([torch.full((candidates[n][0].numel(),), i, dtype=torch.long, device=device)
                       for i, n in enumerate(names)])
    ranked = torch.sort(keys, descending=True, stable=True).indices[:k]
    by_owner = torch.sort(owner[ranked], stable=True)  # groups by tensor, rank order within
    counts = torch.bincount(by_owner.values, minlength=len(names)).tolist()
    selected = index[ranked][by_owner.indices].split(counts)
    return {name: idx.to(scores[name].device) for name, idx, count in zip(names, selected, counts)
            if count}


def _union_over_ranks(candidates: dict, layout, k: int) -> dict:
    """Sharded scores (``layout``: a sharding.Layout): every rank's per-tensor candidates, with
    full-tensor flat indices, gathered on every rank and cut to each tensor's top k. Ranks hold
    ascending row ranges, so rank order keeps indices ascending and the stable sort breaks ties
    by lower index, as one process does."""
    mine = {name: (index.cpu() + layout.offset[name], keys.cpu())
            for name, (index, keys) in candidates.items()}
    gathered = layout.ranks.all_gather_objects(mine)
    merged = {}
    for name in candidates:
        index = torch.cat([part[name][0] for part in gathered])
        keys = torch.cat([part[name][1] for part in gathered])
        best = torch.sort(keys, descending=True, stable=True).indices[:min(k, index.numel())]
        best = best.sort().values  # back to ascending index order
        merged[name] = (index[best], keys[best])
    return merged


def top_k(scores, k: int, mode: str, layout=None) -> Selection:
    """``layout`` (sharding.Layout) when ``scores`` are this rank's shards: the selection is
    then the single-process one (full-tensor indices, on the CPU), on every rank."""
    return _select(scores, k, mode, largest=True, layout=layout)


def bottom_k(scores, k: int, mode: str, layout=None, eligible=None) -> Selection:
    """The K lowest |score|. ``eligible`` (name -> bool mask of this process's part of the
    weight, e.g. the weights a perturbation changes): drawn among those weights first; ineligible
    ones are taken only when too few are eligible."""
    return _select(scores, k, mode, largest=False, layout=layout, eligible=eligible)


def random_k(sizes: dict[str, int], k: int, mode: str, seed: int) -> Selection:
    """K weights drawn uniformly without replacement, from the same eligible set and mode.

    ``sizes``: parameter name -> numel. Indices are returned on CPU, sorted ascending.
    """
    check_k(sizes, k, mode)
    generator = torch.Generator().manual_seed(seed)
    if mode == "per_tensor":
        return {name: _sample_without_replacement(n, k, generator) for name, n in sizes.items()}
    names = list(sizes)
    offsets = torch.tensor([0] + [sizes[n] for n in names]).cumsum(0)
    picks = _sample_without_replacement(int(offsets[-1]), k, generator)
    owner = torch.bucketize(picks, offsets[1:], right=True)
    return {name: picks[owner == i] - offsets[i] for i, name in enumerate(names)
            if bool((owner == i).any())}


def _sample_without_replacement(population: int, k: int, generator) -> torch.Tensor:
    """k distinct integers in [0, population), uniformly; a permutation of the population only
    when k is a large part of it or it is small (a permutation of a million costs ~10 ms, and a
    per-tensor draw makes one per tensor and seed)."""
    if population <= 4 * k or population <= 4096:
        return torch.randperm(population, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        draw = torch.randint(population, (2 * k,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    keep = torch.randperm(chosen.numel(), generator=generator)[:k]
    return chosen[keep].sort().values


def _picked(selection: Selection, scores, params, layout) -> tuple[dict, dict]:
    """Scores and weight values (float32 numpy) at the selected flat indices."""
    if layout is None:
        return ({n: scores[n].reshape(-1)[idx].float().cpu().numpy() for n, idx in selection.items()},
                {n: params[n].detach().reshape(-1)[idx].float().cpu().numpy()
                 for n, idx in selection.items()})
    score_at = layout.values_at({n: (scores[n], idx) for n, idx in selection.items()})
    value_at = layout.values_at({n: (local(params[n]), idx) for n, idx in selection.items()})
    return ({n: v.float().numpy() for n, v in score_at.items()},
            {n: v.float().numpy() for n, v in value_at.items()})


def selection_size(selection: Selection) -> int:
    return sum(int(idx.numel()) for idx in selection.values())


def selection_table(selection: Selection, scores, params, metas: dict[str, ParamMeta],
                    mode: str, layout=None) -> pd.DataFrame:
    """One row per selected weight: rank, parameter, layer, component, row, col, flat_index,
    score (signed), value. row/col use the [out, in] convention; rank is global in global mode
    and within the tensor in per_tensor mode. ``layout``: scores and weights are sharded."""
    frames = []
    order_of = {name: i for i, name in enumerate(scores)}
    score_at, value_at = _picked(selection, scores, params, layout)
    for name, idx in selection.items():
        idx_cpu = idx.cpu()
        meta = metas[name]
        rows, cols = to_out_in(meta, idx_cpu)
        frames.append(pd.DataFrame({
            "parameter": name, "layer": meta.layer if meta.layer is not None else -1,
            "component": meta.component, "row": rows.numpy(), "col": cols.numpy(),
            "flat_index": idx_cpu.numpy(), "score": score_at[name], "value": value_at[name],
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
