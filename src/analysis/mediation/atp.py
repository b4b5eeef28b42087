"""Attribution patching (Nanda 2023; Kramár et al. 2024, AtP) of the residual stream.

Patching site (l, c), the residual-stream channel c at the output of block l, from the clean run
into the damaged run changes the summed NLL by about the first-order term
    Σ_t (h_clean[l, t, c] - h_damaged[l, t, c]) · ∂NLL/∂h[l, t, c]  (at the damaged run),
from one damaged forward and backward per batch for every site at once. Divided by the number
of predicted tokens it estimates the change of the mean NLL, and minus that over the damage
(damaged - clean NLL) estimates the recovered share. The estimate is a prefilter: it is weakest
where super weights act (saturated attention, cancelling paths, normalisation), so the top
sites and a random sample are patched exactly and the two compared.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from src.analysis.mediation.experiments import outcome, recovered_share
from src.analysis.mediation.lab import Lab
from src.eval.patching import output_tensor
from src.eval.perplexity import masked_nll_sum
from src.models.properties import input_device
from src.utils.seeds import stable_seed

OVERLAP_TOP = 20


def first_order(lab: Lab, damaged_replay, first_layer: int) -> torch.Tensor:
    """[blocks from ``first_layer``, channels] float64: the summed first-order NLL change of
    patching each residual site clean (call inside ``lab.zeroed``)."""
    layers = list(range(first_layer, lab.n_blocks))
    device = input_device(lab.model)
    total = None
    with damaged_replay.replaying(first_layer):
        for call, index in enumerate(lab.batches):
            ids, mask = lab.blocks.batch(index, lab.batch_size, device)
            outputs, grads = _damaged_gradients(lab, layers, ids, mask)
            terms = torch.stack([((lab.block_output(l, call).to(g.device) - h) * g)
                                 .double().sum((0, 1)).cpu()
                                 for l, h, g in zip(layers, outputs, grads)])
            total = terms if total is None else total + terms
    shape = total.shape
    return lab.ranks.reduced([total.reshape(-1)])[0].reshape(shape)


def _damaged_gradients(lab: Lab, layers: list[int], ids, mask):
    """Block outputs (detached) and the summed NLL's gradient at each, for one batch."""
    outputs: dict[int, torch.Tensor] = {}

    def start_graph(module, args, kwargs):
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        hidden = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, {**kwargs, "hidden_states": hidden}

    def keeper(layer):
        def keep(module, inputs, output):
            outputs[layer] = output_tensor(output)
        return keep

    handles = [lab.layer_list[layers[0]].register_forward_pre_hook(start_graph, with_kwargs=True)]
    handles += [lab.layer_list[l].register_forward_hook(keeper(l)) for l in layers]
    try:
        with torch.enable_grad():
            logits = lab.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = masked_nll_sum(logits, ids, mask)
            grads = torch.autograd.grad(loss, [outputs[l] for l in layers])
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[l].detach() for l in layers], grads


def compare(lab: Lab, damaged_replay, damaged, first_layer: int, n_top: int, seed: int) -> dict:
    """AtP for every residual site from ``first_layer`` on, and exact patching of its ``n_top``
    best sites and of ``n_top`` other sites drawn at random (call inside ``lab.zeroed``)."""
    summed = first_order(lab, damaged_replay, first_layer)
    damage = damaged.nll - lab.clean.nll
    estimate = -(summed / lab.clean.n_tokens) / damage  # recovered share, per site
    flat = estimate.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    top = order[:n_top]
    generator = torch.Generator().manual_seed(stable_seed(seed, "atp sample"))
    rest = order[n_top:]
    sampled = rest[torch.randperm(rest.numel(), generator=generator)[:n_top]]
    channels = estimate.shape[1]
    rows = []
    for chosen, sites in (("top", top), ("random", sampled)):
        for site in sites.tolist():
            layer, channel = first_layer + site // channels, site % channels
            result = lab.evaluate(layer, [lab.restore_block(layer, [channel])], damaged_replay)
            rows.append({"layer": layer, "channel": channel, "chosen": chosen,
                         "estimate": float(flat[site]),
                         "exact": recovered_share(damaged.nll, result.nll, lab.clean.nll),
                         **outcome(result, lab.clean)})
    best = int(order[0])
    return {"first_layer": first_layer, "n_sites": flat.numel(),
            "top_site": {"layer": first_layer + best // channels, "channel": best % channels,
                         "estimate": float(flat[best])},
            "by_layer_max": [{"layer": first_layer + i, "channel": int(row.argmax()),
                              "estimate": float(row.max())} for i, row in enumerate(estimate)],
            "evaluated": rows, **agreement(rows)}


def agreement(rows: list[dict]) -> dict:
    """Spearman and Pearson of estimate against exact over the evaluated sites, and the share
    of the exact top-20 (among them) that the estimate's top-20 contains."""
    pairs = [(r["estimate"], r["exact"]) for r in rows if r["exact"] is not None]
    if len(pairs) < 3:
        return {"spearman": None, "pearson": None, "top20_overlap": None, "n_compared": len(pairs)}
    estimate, exact = (np.array(v, dtype=float) for v in zip(*pairs))
    n = min(OVERLAP_TOP, len(pairs))
    by_estimate = set(np.argsort(-estimate, kind="stable")[:n].tolist())
    by_exact = set(np.argsort(-exact, kind="stable")[:n].tolist())
    return {"spearman": float(stats.spearmanr(estimate, exact).statistic),
            "pearson": float(stats.pearsonr(estimate, exact).statistic),
            "top20_overlap": len(by_estimate & by_exact) / n, "n_compared": len(pairs)}
