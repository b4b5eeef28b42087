"""Super-weight discovery (Yu et al. 2024, "The Super Weight in Large Language Models"): find the
single weights of the MLP output projections that create massive activations, automatically,
and check each one causally against controls.

Detection (on the calibration blocks, real tokens only). A forward hook on every block's MLP
output projection (component ``mlp_down``: Llama/Mistral ``down_proj``, GPT-2 ``mlp.c_proj``,
GPT-NeoX ``dense_4h_to_h``, OPT ``fc2``) records the peak |activation| of every input channel and
every output channel. Per layer:

* ``input_max`` / ``input_channel``: the largest |input| and its channel; ``output_max`` /
  ``output_channel`` the same for the output.
* ``input_ratio`` / ``output_ratio``: that maximum divided by the median over the layer's
  channels of their peak |activation| (the lower middle value for an even channel count), i.e.
  how far one channel stands out inside the layer. ``*_ratio_across_layers``: the layer's
  maximum divided by the median over all hooked layers of their maxima (the spike profile over
  depth).
* A layer *spikes* when ``output_ratio >= spike_threshold`` (default ``SPIKE_THRESHOLD`` = 100:
  one output channel peaks two orders of magnitude above the layer's typical channel). Its
  candidate super weight is (row = output_channel, col = input_channel) in [out, in]
  coordinates (GPT-2 ``Conv1D`` weights are stored [in, out]; ``flat_index`` is into the stored
  tensor).
* ``spike_share`` = W[row, col] * x[col] / y[row] at the token where the output peaks: the share of
  the spike that the candidate weight alone produces.

Iteration. Among the spiking layers whose candidate is not already found, the one with the
largest ``output_ratio`` gives the next candidate. All candidates so far are zeroed (through
``perturbed(..., "zero")``, exact bits restored afterwards) and detection runs again, until
``max_weights`` candidates are found or no spiking layer offers a new one. (Zeroing a weight does
not change its own layer's input, so a layer whose spike survives proposes the same coordinates
again and is passed over.) Detection runs once more after the last candidate, so ``passes``
also shows what remains with the whole set zeroed.

Causal check (on the evaluation blocks, which detection never saw). ``ratio`` always means
perplexity / baseline perplexity.

* Each candidate alone: zeroed by itself. Controls: one random weight of the same tensor per
  seed, and the largest-|w| weight of that tensor that is not a candidate (a candidate can itself
  be its tensor's largest weight, and the control must differ from the treatment).
* The whole set, zeroed together. Controls: per tensor the same number of random weights (per
  seed) and the same number of largest-|w| non-candidate weights.
* A candidate is **confirmed** when ``ratio_alone > max(all its control ratios) + CONFIRM_MARGIN``
  (0.10): zeroing it raises perplexity by more than 10% of the baseline beyond the most damaging
  control. The set ``clears_controls`` under the same rule.

Cross-check. Where each candidate ranks under the run's metric by |score|: rank = 1 + the number
of weights with a strictly larger |score|, within its tensor and over all scored tensors
(``None`` when its tensor was not scored, e.g. outside ``--layers``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from src.data.loading import TokenBlocks
from src.errors import UserError
from src.eval.perplexity import evaluate, input_device
from src.models.components import ParamMeta, component_of, describe_parameters, from_out_in, layer_index
from src.sensitivity.perturb import fingerprint, perturbed
from src.sensitivity.rank import Selection, random_k, top_k

SPIKE_THRESHOLD = 100.0   # output_ratio at or above which a layer spikes
MAX_WEIGHTS = 5           # default --super-weight-max
CONFIRM_MARGIN = 0.10     # ratio_alone must exceed the worst control ratio by this much


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
        raise UserError("--super-weights: found no MLP output projection (down_proj, mlp.c_proj, "
                        "dense_4h_to_h, fc2) in this model")
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


# ----------------------------------------------------------------------------- causal check

def random_control(name: str, numel: int, n: int, exclude: torch.Tensor, seed: int) -> torch.Tensor:
    """n distinct flat indices drawn uniformly from the tensor minus ``exclude`` (sorted).

    A uniform (n + |exclude|)-subset with the excluded entries removed, thinned to a uniform
    n-subset, is uniform over the n-subsets of the remaining weights.
    """
    drawn = random_k({name: numel}, n + exclude.numel(), "per_layer", seed)[name]
    kept = drawn[~torch.isin(drawn, exclude.cpu())]
    generator = torch.Generator().manual_seed(seed)
    return kept[torch.randperm(kept.numel(), generator=generator)[:n]].sort().values


def magnitude_control(name: str, param: torch.Tensor, n: int, exclude: torch.Tensor) -> torch.Tensor:
    """Flat indices of the n largest-|w| weights of the tensor outside ``exclude`` (rank order,
    ties to the lower index as in ``rank.top_k``)."""
    ranked = top_k({name: param.detach()}, min(n + exclude.numel(), param.numel()), "per_layer")[name]
    return ranked[~torch.isin(ranked, exclude.to(ranked.device))][:n]


def _condition(params, selection: Selection, ppl_of, baseline_ppl: float) -> dict:
    with perturbed(params, selection, "zero"):
        ppl = ppl_of()
    return {"perplexity": ppl, "ratio": ppl_ratio(ppl, baseline_ppl)}


def ppl_ratio(ppl: float, baseline_ppl: float) -> float:
    """perplexity / baseline perplexity; NaN when the baseline is not a positive finite number."""
    if not (math.isfinite(baseline_ppl) and baseline_ppl > 0):
        return math.nan
    return ppl / baseline_ppl


def _controls(params, counts: dict[str, int], exclude: Selection, seeds, ppl_of,
              baseline_ppl: float) -> dict:
    """Random (per seed) and largest-|w| controls with ``counts[name]`` weights per tensor."""
    randoms = []
    for seed in seeds:  # an independent draw per tensor: stream seed * 1009 + tensor position
        selection = {name: random_control(name, params[name].numel(), n, exclude[name],
                                          seed * 1009 + position)
                     for position, (name, n) in enumerate(counts.items())}
        randoms.append({"seed": seed, **_condition(params, selection, ppl_of, baseline_ppl),
                        "flat_index": _flat_lists(selection)})
    largest = {name: magnitude_control(name, params[name], n, exclude[name])
               for name, n in counts.items()}
    magnitude = {**_condition(params, largest, ppl_of, baseline_ppl),
                 "flat_index": _flat_lists(largest),
                 "value": {name: params[name].detach().reshape(-1)[idx.to(params[name].device)]
                           .float().cpu().tolist() for name, idx in largest.items()}}
    worst = max([r["ratio"] for r in randoms] + [magnitude["ratio"]])
    return {"random": randoms, "largest_magnitude": magnitude, "max_control_ratio": worst}


def _flat_lists(selection: Selection) -> dict[str, list[int]]:
    return {name: idx.cpu().tolist() for name, idx in selection.items()}


def clears(ratio: float, max_control_ratio: float, margin: float = CONFIRM_MARGIN) -> bool:
    """The confirmation rule: ratio > worst control ratio + margin (False on NaN)."""
    return bool(ratio > max_control_ratio + margin)


def causal_check(params: dict[str, torch.nn.Parameter], candidates: list[dict], ppl_of,
                 baseline_ppl: float, seeds, progress: bool = False) -> dict:
    """Zero each candidate alone and the whole set, each against its controls; adds
    ``alone`` / ``confirmed`` to every candidate and returns the set's record."""
    everything = candidate_selection(candidates)
    for c in tqdm(candidates, desc="super-weight causal check", disable=not progress, leave=False):
        alone = {c["parameter"]: torch.tensor([c["flat_index"]])}
        c["alone"] = _condition(params, alone, ppl_of, baseline_ppl)
        c["controls"] = _controls(params, {c["parameter"]: 1}, everything, seeds, ppl_of,
                                  baseline_ppl)
        c["confirmed"] = clears(c["alone"]["ratio"], c["controls"]["max_control_ratio"])
    if not candidates:
        return {"n_weights": 0}
    if len(candidates) == 1:  # the set is the candidate: same conditions, same control draws
        only = candidates[0]
        return {"n_weights": 1, **only["alone"], "controls": only["controls"],
                "clears_controls": only["confirmed"]}
    whole = {"n_weights": len(candidates), **_condition(params, everything, ppl_of, baseline_ppl)}
    counts = {name: int(idx.numel()) for name, idx in everything.items()}
    whole["controls"] = _controls(params, counts, everything, seeds, ppl_of, baseline_ppl)
    whole["clears_controls"] = clears(whole["ratio"], whole["controls"]["max_control_ratio"])
    return whole


# ----------------------------------------------------------------------------- cross-check

def metric_rank(scores: dict[str, torch.Tensor], name: str, flat_index: int) -> dict | None:
    """Rank by |score| of one weight (1 = highest; ties share the best rank), within its tensor
    and over all scored tensors; None when the tensor was not scored."""
    if name not in scores:
        return None
    score = scores[name].reshape(-1)[flat_index]
    key = score.abs()
    above = torch.stack([(s.detach().abs() > key.to(s.device)).sum().cpu() for s in scores.values()])
    in_tensor = int(above[list(scores).index(name)])
    return {"score": float(score), "rank_in_tensor": in_tensor + 1,
            "n_in_tensor": scores[name].numel(), "rank_global": int(above.sum()) + 1,
            "n_global": sum(s.numel() for s in scores.values())}


# ----------------------------------------------------------------------------- the step

def analyze(model, calibration: TokenBlocks, evaluation: TokenBlocks, batch_size: int, *,
            threshold: float = SPIKE_THRESHOLD, max_weights: int = MAX_WEIGHTS,
            seeds=(0, 1, 2), baseline_ppl: float | None = None, scores=None,
            metric: str | None = None, progress: bool = False) -> dict:
    """Detection, iteration, causal check and cross-check; returns the ``super_weights`` section
    of enhanced_analysis.json (weights restored bit-exactly; ``restore_verified`` says so)."""
    targets = mlp_down_targets(model)
    params = {t.param_name: t.param for t in targets}
    reference = fingerprint(params)

    def ppl_of() -> float:
        return evaluate(model, evaluation, batch_size).perplexity

    if baseline_ppl is None:
        baseline_ppl = ppl_of()
    candidates, passes = find_candidates(model, targets, calibration, batch_size, threshold,
                                         max_weights, progress)
    whole = causal_check(params, candidates, ppl_of, baseline_ppl, seeds, progress)
    for c in candidates:
        c["metric_rank"] = metric_rank(scores, c["parameter"], c["flat_index"]) if scores else None
    return {
        "method": {"hooked": "MLP output projection (component mlp_down) of every block",
                   "detection_blocks": len(calibration), "evaluation_blocks": len(evaluation),
                   "spike_threshold": threshold,
                   "spike_rule": "output_ratio = max |output| / median over the layer's output "
                                 "channels of their peak |output|; spike when >= spike_threshold",
                   "max_weights": max_weights, "seeds": list(seeds),
                   "confirm_rule": "ratio_alone > max(control ratios) + confirm_margin; ratio = "
                                   "perplexity / baseline perplexity; controls: one random weight "
                                   "of the same tensor per seed, the largest-|w| non-candidate "
                                   "weight of the same tensor",
                   "confirm_margin": CONFIRM_MARGIN, "coordinates": "[out, in]",
                   "metric": metric},
        "baseline_perplexity": baseline_ppl,
        "layers": passes[0],
        "passes": passes,
        "candidates": candidates,
        "set": whole,
        "n_candidates": len(candidates),
        "n_confirmed": sum(c["confirmed"] for c in candidates),
        "restore_verified": fingerprint(params) == reference,
    }


def print_report(section: dict) -> None:
    """Printed table of the candidates, their effects and the cross-check."""
    base = section["baseline_perplexity"]
    metric = section["method"]["metric"]
    print(f"[cwa] super weights: {section['n_candidates']} candidates, {section['n_confirmed']} "
          f"confirmed (baseline perplexity {base:.3f}; spike threshold "
          f"{section['method']['spike_threshold']:g}x the layer median)")
    if not section["candidates"]:
        return
    print(f"  {'#':>2} {'parameter':<40} {'[row, col]':>13} {'value':>9} {'spike':>9} "
          f"{'ppl x alone':>12} {'worst ctrl x':>13} {'confirmed':>9} "
          f"{'rank ' + (metric or '-'):>22}")
    for i, c in enumerate(section["candidates"], 1):
        rank = c["metric_rank"]
        where = f"{rank['rank_global']} (tensor {rank['rank_in_tensor']})" if rank else "-"
        print(f"  {i:>2} {c['parameter']:<40} {'[' + str(c['row']) + ', ' + str(c['col']) + ']':>13} "
              f"{c['value']:>9.4f} {c['output_ratio']:>8.1f}x {_x(c['alone']['ratio']):>12} "
              f"{_x(c['controls']['max_control_ratio']):>13} {str(c['confirmed']):>9} {where:>22}")
    whole = section["set"]
    print(f"[cwa] whole set zeroed: perplexity x{_x(whole['ratio'])} (worst control "
          f"x{_x(whole['controls']['max_control_ratio'])}); weights restored bit-exactly: "
          f"{section['restore_verified']}")


def _x(ratio: float) -> str:
    return f"{ratio:.4g}" if math.isfinite(ratio) else str(ratio)
