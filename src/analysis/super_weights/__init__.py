"""--super-weights (Yu et al. 2024, "The Super Weight in Large Language Models"): find the
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

from dataclasses import dataclass

import numpy as np

from src.analysis.context import AnalysisContext
from src.analysis.registry import Analysis, register
from src.analysis.super_weights.causal import CONFIRM_MARGIN, Zeroing, causal_check, metric_rank
from src.analysis.super_weights.detection import (MAX_WEIGHTS, SPIKE_THRESHOLD, find_candidates,
                                                  mlp_down_targets)
from src.data.loading import TokenBlocks
from src.eval.perplexity import EvalResult, evaluate
from src.options import Settings, integer, number, option
from src.distributed import sharding
from src.sensitivity.perturb import fingerprint
from src.utils.format import fixed, sig, times

GROUP = "super weights"


def _searching(config) -> bool:
    return config.analysis_enabled("super_weights")


@dataclass(frozen=True)
class SuperWeightSettings(Settings):
    GROUP_HELP = ("single MLP output-projection weights behind massive activations (Yu et al. "
                  "2024); results go to enhanced_analysis.json: super_weights")
    super_weights: bool = option(
        False, "hook every block's MLP output projection on the calibration blocks, take (row = "
        "spiking output channel, col = largest input channel) of the spiking layer, zero it and "
        "detect again; then zero each candidate against same-tensor random (per --seeds) and "
        "largest-|w| controls on the evaluation blocks, and report where the confirmed ones rank "
        "under --metric", group=GROUP)
    super_weight_max: int = option(MAX_WEIGHTS, "--super-weights: stop after this many "
                                   "candidates", group=GROUP, parse=integer(1),
                                   used_when=("--super-weights", _searching))
    spike_threshold: float = option(
        SPIKE_THRESHOLD, "--super-weights: a layer spikes when its largest |output| activation "
        "is at least this many times the median over its output channels of their peak "
        "|activation|", group=GROUP, parse=number(1.0, low_open=True),
        used_when=("--super-weights or --mediation",
                   lambda c: _searching(c) or c.value("mediation")))


def check_model(settings, preflight) -> None:
    """Before the run: the model has MLP output projections to hook."""
    mlp_down_targets(preflight.model)


def analyze(model, calibration: TokenBlocks, evaluation: TokenBlocks, batch_size: int, *,
            threshold: float = SPIKE_THRESHOLD, max_weights: int = MAX_WEIGHTS,
            seeds=(0, 1, 2), baseline: EvalResult | None = None, scores=None,
            metric: str | None = None, progress: bool = False, score_layout=None) -> dict:
    """Detection, iteration, causal check and cross-check; returns the ``super_weights`` section
    of enhanced_analysis.json (weights restored bit-exactly; ``restore_verified`` says so).
    Under --shard (a sharded ``model``; ``score_layout``: where the scores' rows live) each rank
    runs its share of the batches and zeroes the candidates it holds."""
    targets = mlp_down_targets(model)
    params = {t.param_name: t.param for t in targets}
    ranks = sharding.ranks_of(model)
    layout = sharding.Layout.of(params, ranks) if ranks is not None else None
    reference = fingerprint(params)

    def evaluate_model() -> EvalResult:
        return evaluate(model, evaluation, batch_size)

    baseline = baseline or evaluate_model()
    candidates, passes = find_candidates(model, targets, calibration, batch_size, threshold,
                                         max_weights, progress, layout)
    zeroing = Zeroing(params, evaluate_model, baseline, layout)
    whole = causal_check(zeroing, candidates, seeds, progress)
    for c in candidates:
        c["metric_rank"] = metric_rank(scores, c["parameter"], c["flat_index"],
                                       score_layout) if scores else None
    restored = zeroing.restored and fingerprint(params) == reference
    if ranks is not None:
        restored = ranks.all_true(restored)
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
        "baseline_perplexity": baseline.perplexity,
        "layers": passes[0],
        "passes": passes,
        "candidates": candidates,
        "set": whole,
        "n_candidates": len(candidates),
        "n_confirmed": sum(c["confirmed"] for c in candidates),
        "restore_verified": restored,
    }


def run(ctx: AnalysisContext) -> dict:
    s = ctx.settings
    return analyze(ctx.model, ctx.data.calibration, ctx.data.evaluation, ctx.batch_size,
                   threshold=s.spike_threshold, max_weights=s.super_weight_max, seeds=ctx.seeds,
                   baseline=ctx.baseline, scores=ctx.scores, metric=ctx.metric,
                   progress=ctx.progress, score_layout=ctx.layout)


def summary_lines(section: dict) -> list[str]:
    """The candidates, their effects and the cross-check, as a table."""
    metric = section["method"]["metric"]
    lines = [f"super weights: {section['n_candidates']} candidates, {section['n_confirmed']} "
             f"confirmed (baseline perplexity {fixed(section['baseline_perplexity'])}; spike "
             f"threshold {section['method']['spike_threshold']:g}x the layer median)"]
    if not section["candidates"]:
        return lines
    lines.append(f"  {'#':>2} {'parameter':<40} {'[row, col]':>13} {'value':>9} {'spike':>9} "
                 f"{'ppl x alone':>12} {'worst ctrl x':>13} {'confirmed':>9} "
                 f"{'rank ' + (metric or '-'):>22}")
    for i, c in enumerate(section["candidates"], 1):
        rank = c["metric_rank"]
        where = f"{rank['rank_global']} (tensor {rank['rank_in_tensor']})" if rank else "-"
        coordinates = f"[{c['row']}, {c['col']}]"
        lines.append(f"  {i:>2} {c['parameter']:<40} {coordinates:>13} {c['value']:>9.4f} "
                     f"{c['output_ratio']:>8.1f}x {sig(c['alone']['ratio']):>12} "
                     f"{sig(c['controls']['max_control_ratio']):>13} {str(c['confirmed']):>9} "
                     f"{where:>22}")
    whole = section["set"]
    lines.append(f"whole set zeroed: perplexity x{sig(whole['ratio'])} (worst control "
                 f"x{sig(whole['controls']['max_control_ratio'])}); weights restored "
                 f"bit-exactly: {section['restore_verified']}")
    return lines


def findings(section: dict) -> list[str]:
    lines = [f"Super weights: {section['n_candidates']} candidate(s) from activation spikes "
             f"(threshold {section['method']['spike_threshold']:g}x the layer median), "
             f"{section['n_confirmed']} confirmed against same-tensor controls."]
    metric = section["method"].get("metric")
    for c in section.get("candidates", []):
        rank = c.get("metric_rank")
        ranked = "" if not rank else (
            f"; {metric} ranks it {rank['rank_global']:,} of {rank['n_global']:,} scored "
            f"weights ({rank['rank_in_tensor']:,} in its tensor)")
        lines.append(f"{c.get('parameter') or 'layer ' + str(c['layer'])} [{c['row']}, "
                     f"{c['col']}] (spike {sig(c.get('output_ratio'), 3)}x): zeroing it alone "
                     f"gives perplexity {times(c['alone']['ratio'])} the baseline, the worst "
                     f"control {times(c['controls']['max_control_ratio'])}"
                     + (" (confirmed)" if c.get("confirmed") else " (not confirmed)")
                     + ranked + ".")
    return lines


def plot_spikes(section: dict):
    from src.plots.style import colours, plt

    threshold = section["method"]["spike_threshold"]
    candidates = section.get("candidates", [])
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8),
                                         gridspec_kw={"width_ratios": [1.6, 1]})
    passes = section.get("passes") or [section["layers"]]
    for index, (layers, colour) in enumerate(zip(passes, colours(len(passes)))):
        label = "intact model" if index == 0 else f"after zeroing {index} candidate(s)"
        left.plot([x["layer"] for x in layers], [x["output_ratio"] for x in layers],
                  "-o" if index == 0 else ":", color=colour, markersize=4, label=label)
    left.axhline(threshold, color="black", linestyle="--", linewidth=1,
                 label=f"spike threshold {threshold:g}x")
    for c in candidates:
        left.annotate(f"[{c['row']}, {c['col']}]", (c["layer"], c["output_ratio"]),
                      textcoords="offset points", xytext=(4, 6), fontsize=7)
    left.set_yscale("log")
    left.set_xlabel("transformer block (layer index)")
    left.set_ylabel("max |MLP output| / median channel peak\n(log scale)")
    left.set_title("Activation spikes at the MLP output projection", fontsize=10)
    left.legend(fontsize=7)
    _plot_effects(right, candidates)
    figure.suptitle(f"Super weights: {section['n_candidates']} candidate(s), "
                    f"{section['n_confirmed']} confirmed against same-tensor controls "
                    f"(baseline perplexity {section['baseline_perplexity']:.3f})", fontsize=11)
    figure.tight_layout()
    return figure


def _plot_effects(ax, candidates: list[dict]) -> None:
    from src.plots.style import SELECTION_COLOURS

    if not candidates:
        ax.text(0.5, 0.5, "no layer crossed the spike threshold", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    labels = [f"L{c['layer']} [{c['row']},{c['col']}]" + ("\nconfirmed" if c.get("confirmed")
                                                           else "") for c in candidates]
    alone = np.array([c["alone"]["ratio"] for c in candidates], dtype=float)
    control = np.array([c["controls"]["max_control_ratio"] for c in candidates], dtype=float)
    x = np.arange(len(candidates))
    top = np.nanmax(np.concatenate([alone[np.isfinite(alone)], control[np.isfinite(control)],
                                    [1.0]])) * 3
    for offset, values, label, selection in ((-0.2, alone, "candidate zeroed", "top_k"),
                                             (0.2, control, "worst control zeroed", "random_k")):
        ax.bar(x + offset, np.where(np.isfinite(values), values, top), 0.4, label=label,
               color=SELECTION_COLOURS[selection], edgecolor="black", linewidth=0.3)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("perplexity / baseline (log scale)")
    ax.set_xlabel("candidate: layer [row, col] in [out, in]")
    ax.set_title("Causal check on the evaluation blocks", fontsize=10)
    ax.legend(fontsize=7)


register(Analysis(
    key="super_weights", flag="--super-weights",
    run=run, summary=summary_lines, findings=findings,
    settings=(SuperWeightSettings,), prepare=check_model, enabled=lambda s: s.super_weights,
    plots={"super_weight_spikes": plot_spikes}))
