"""The exact experiments of --mediation: restore, remove, flow and pairs (see the package
docstring for what each one measures)."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from src.analysis.mediation.lab import Lab, block_modules
from src.analysis.mediation.sources import Source
from src.eval.patching import Patch, constant
from src.eval.perplexity import EvalResult
from src.utils.seeds import stable_seed

POSITIONS = ("all", "spike", "first")
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


def recovered_share(damaged: float, patched: float, clean: float) -> float | None:
    """The share of the NLL damage that a patch undoes (None when there is no damage)."""
    damage = damaged - clean
    if not np.isfinite(damage) or abs(damage) < 1e-12:
        return None
    return float((damaged - patched) / damage)


def outcome(result: EvalResult, clean: EvalResult) -> dict:
    return {"nll": result.nll, "delta_nll": result.nll - clean.nll,
            "ppl_ratio": result.perplexity / clean.perplexity}


# ----------------------------------------------------------------------------- restore

def position_masks(lab: Lab, module: str, channel: int, which: str, threshold: float):
    """Per call, the [batch, length] positions patched (None: all of them)."""
    if which == "all":
        return None
    if which == "first":
        return [torch.zeros_like(m).index_fill_(1, torch.tensor([0]), True) & m
                for m in lab.masks]
    bar = threshold * float(lab.channel_peaks(module).median())
    return [(out[..., channel].abs().float() >= bar) & m
            for out, m in zip(lab.outputs[module], lab.masks)]


def restore(lab: Lab, source: Source, damaged: EvalResult, threshold: float) -> list[dict]:
    """With the source zeroed, the channels it feeds patched back to clean at all, spike and
    first positions (call inside ``lab.zeroed``)."""
    rows = []
    for which in POSITIONS:
        patches, n_positions = [], 0
        for module, channels in source.channels.items():
            per_channel = [[c] for c in channels] if which == "spike" else [channels]
            for group in per_channel:
                masks = position_masks(lab, module, group[0], which, threshold)
                n_positions += len(group) * sum(int(m.sum()) for m in (masks or lab.masks))
                positions = None if masks is None else masks.__getitem__
                patches.append(lab.restore(module, group, positions))
        result = lab.evaluate(source.layer, patches)
        rows.append({"source": source.label, "positions": which,
                     "n_positions": int(lab.ranks.reduced([torch.tensor(n_positions)])[0]),
                     **outcome(result, lab.clean),
                     "recovered_share": recovered_share(damaged.nll, result.nll, lab.clean.nll)})
    return rows


# ----------------------------------------------------------------------------- remove

def control_channels(module: str, n_channels: int, exclude: int, seeds) -> list[int]:
    """Per seed, one channel of the module other than ``exclude``, uniformly."""
    chosen = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(stable_seed(seed, module, "mediation"))
        pick = int(torch.randint(n_channels - 1, (1,), generator=generator))
        chosen.append(pick + (pick >= exclude))
    return chosen


def remove(lab: Lab, source: Source, means: dict, seeds) -> list[dict]:
    """On the clean model, the source's channel zeroed and mean-replaced at every position,
    against the same operation on random channels of the same module (one per seed)."""
    (module, channels), = source.channels.items()
    channel = channels[0]
    mean = means[module]
    controls = control_channels(module, mean.numel(), channel, seeds)
    rows = []
    for operation in ("zero", "mean"):
        def effect(c: int) -> dict:
            value = torch.zeros(1) if operation == "zero" else mean[c:c + 1]
            patch = Patch(lab.modules[module], torch.tensor([c]), constant(value))
            return outcome(lab.evaluate(source.layer, [patch]), lab.clean)
        treated = effect(channel)
        control_rows = [{"seed": s, "channel": c, **effect(c)} for s, c in zip(seeds, controls)]
        rows.append({"source": source.label, "module": module, "channel": channel,
                     "operation": operation,
                     "value": 0.0 if operation == "zero" else float(mean[channel]), **treated,
                     "controls": control_rows,
                     "max_control_delta_nll": max(r["delta_nll"] for r in control_rows)})
    return rows


# ----------------------------------------------------------------------------- flow

def flow(lab: Lab, source: Source, damaged_replay, damaged: EvalResult) -> list[dict]:
    """Inside ``lab.zeroed(source)``: per later block, the clean residual-stream channel that
    the source writes (block output) and the whole attention and MLP output of the block patched
    into the damaged run, and the share of the damage each recovers."""
    sites = block_modules(lab.model, lab.n_blocks)
    rows = []
    for layer in range(source.layer, lab.n_blocks):
        candidates = []
        if source.residual_channel is not None:
            candidates.append(("residual", lab.restore_block(layer, [source.residual_channel])))
        if layer > source.layer:
            candidates += [(kind, lab.restore(sites[kind][layer], None))
                           for kind in sites if layer in sites[kind]]
        for site, patch in candidates:
            result = lab.evaluate(layer, [patch], damaged_replay)
            rows.append({"layer": layer, "site": site, **outcome(result, lab.clean),
                         "recovered_share": recovered_share(damaged.nll, result.nll,
                                                            lab.clean.nll)})
    return rows


# ----------------------------------------------------------------------------- pairs

def pairs(lab: Lab, singles: list[Source], damaged: dict[str, EvalResult], seed: int) -> list:
    """Each pair of single sources: ΔNLL of each alone, of both zeroed together, and the
    interaction (joint minus the sum), with percentile bootstrap intervals over blocks."""
    rows = []
    for a, b in itertools.combinations(singles, 2):
        both = {**a.selection}
        for name, index in b.selection.items():
            both[name] = torch.cat([both[name], index]).unique() if name in both else index
        layers = [s.layer for s in (a, b)]
        with lab.zeroed(both):
            joint = lab.evaluate(None if None in layers else min(layers))
        sums = {"a": damaged[a.label], "b": damaged[b.label], "joint": joint}
        deltas = bootstrap_deltas(lab.clean, sums, seed)
        rows.append({"a": a.label, "b": b.label, **deltas})
    return rows


def bootstrap_deltas(clean: EvalResult, results: dict[str, EvalResult], seed: int) -> dict:
    """ΔNLL (token mean over the blocks) of each result and the interaction joint - a - b,
    each with a percentile bootstrap interval from resampling evaluation blocks."""
    tokens = clean.block_tokens.double().numpy()
    per_block = {k: (r.block_nll_sum - clean.block_nll_sum).double().numpy()
                 for k, r in results.items()}
    per_block["interaction"] = per_block["joint"] - per_block["a"] - per_block["b"]
    rng = np.random.default_rng(stable_seed(seed, "mediation pairs"))
    draws = rng.integers(0, len(tokens), size=(BOOTSTRAP_SAMPLES, len(tokens)))
    tail = (1 - CONFIDENCE) / 2 * 100
    out = {}
    for key, values in per_block.items():
        with np.errstate(invalid="ignore"):
            boot = values[draws].sum(1) / tokens[draws].sum(1)
        low, high = np.nanpercentile(boot, [tail, 100 - tail])
        out[f"delta_nll_{key}" if key != "interaction" else "interaction"] = \
            float(values.sum() / tokens.sum())
        out[f"{key}_interval"] = [float(low), float(high)]
    return out
