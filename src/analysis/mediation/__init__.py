"""--mediation: why a weight matters, by activation patching.

Sources: the super-weight candidates when --super-weights runs (the first --mediation-weights of
them alone, and all of them together), otherwise the strongest --mediation-weights weights of
the run's global top-K alone and the whole top-K set. A source is *damaged* by zeroing its
weights; a weight feeds one output channel of its module (sources.py). All measures are on the
first --mediation-eval-samples evaluation blocks, in mean NLL per predicted token (nats);
``recovered_share`` = (NLL damaged - NLL patched) / (NLL damaged - NLL clean).

* **restore**: with the source zeroed, the channels it feeds are set back to the clean run's
  values at every position (``all``: exact recovery by construction, the sanity check), only
  where the clean channel spikes (``spike``: |value| >= --spike-threshold x the median over the
  module's channels of their peak |output|, Yu et al.'s massive activation) and only at each
  block's first token (``first``).
* **remove**: on the clean model, the single source's channel is zeroed, or replaced by its mean
  over the calibration tokens (Sun et al. 2024), at every position; controls: the same
  operation on one random channel of the same module per seed.
* **flow**: for the source with the largest damage, the clean residual-stream channel it writes
  (the output of each block from its own on) and the whole attention and MLP output of each
  later block are patched into the damaged run, one site at a time.
* **atp**: attribution patching estimates every residual-stream site (block, channel) from one
  backward pass (atp.py); its --atp-exact best sites and as many random ones are patched exactly.
* **pairs**: for each pair of single sources, ΔNLL alone, together, and the interaction
  (together minus the sum), with 95% percentile bootstrap intervals over evaluation blocks.

Every experiment changes the model at the source's block or later and is evaluated from there,
the earlier blocks replayed from a recording (lab.py; exact). Every weight is restored
bit-exactly (checksum) and every hook removed (counted), both verified in the section.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

from src.analysis.context import AnalysisContext
from src.analysis.faults.flips import first_blocks
from src.analysis.mediation import atp, present
from src.analysis.mediation.experiments import flow, pairs, remove, restore
from src.analysis.mediation.lab import Lab, block_modules, calibration_means
from src.analysis.mediation.sources import sources
from src.analysis.registry import Analysis, register
from src.analysis.super_weights.detection import mlp_down_targets
from src.eval.patching import hook_count
from src.eval.replay import decoder_blocks
from src.options import Settings, integer, option
from src.sensitivity.perturb import fingerprint
from src.utils import progress

GROUP = "mediation"


def _mediating(c) -> bool:
    return bool(c.value("mediation"))


@dataclass(frozen=True)
class MediationSettings(Settings):
    GROUP_HELP = ("why a weight matters: its activation restored, removed and patched layer by "
                  "layer (mediation.json)")
    mediation: bool = option(
        False, "activation patching of the super weights (--super-weights) or of the top-K "
        "weights: restore their output channel (all / spike / first positions), remove it "
        "(zero, mean) against random channels, per-layer flow, attribution patching against "
        "exact patching, and pair interactions", group=GROUP)
    mediation_eval_samples: int = option(
        4, "--mediation: evaluation blocks every patched run is measured on (also the blocks "
        "the pair intervals resample)", group=GROUP, parse=integer(1),
        used_when=("--mediation", _mediating))
    mediation_weights: int = option(
        3, "--mediation: single weights studied alone (super-weight candidates, else the "
        "strongest top-K weights); pairs are formed among them", group=GROUP, parse=integer(1),
        used_when=("--mediation", _mediating))
    atp_exact: int = option(
        20, "--mediation: residual-stream sites with the best attribution-patching estimate, "
        "and as many random ones, patched exactly", group=GROUP, parse=integer(1),
        used_when=("--mediation", _mediating))

    def problems(self, config):
        if self.mediation and config.shard:
            yield "--mediation does not run under --shard yet (its hooks patch whole " \
                  "activations); run it without --shard (torchrun data parallel works)"


def check_model(settings, preflight) -> None:
    """Before the run: the model has decoder blocks with MLP output projections."""
    mlp_down_targets(preflight.model)


def run(ctx: AnalysisContext) -> dict:
    s = ctx.settings
    model = ctx.model
    super_section = ctx.cache.get(("section", "super_weights")) if s.super_weights else None
    origin, singles, whole = sources(model, super_section, ctx.scores, ctx.k,
                                     s.mediation_weights)
    everything = singles + ([whole] if whole else [])
    section = {"method": method(s, ctx, origin), "sources": [x.describe() for x in everything]}
    if not everything:
        return {**section, "skipped": "no super-weight candidate was found",
                "restore_verified": True, "hooks_removed": True}
    reference, hooks = fingerprint(dict(model.named_parameters())), hook_count(model)
    lab = make_lab(ctx, everything, s.mediation_eval_samples)
    section.update(experiments(ctx, lab, singles, everything))
    section["restore_verified"] = fingerprint(dict(model.named_parameters())) == reference
    section["hooks_removed"] = hook_count(model) == hooks
    return section


def make_lab(ctx: AnalysisContext, everything, n_blocks: int) -> Lab:
    target = mlp_down_targets(ctx.model)[0]
    layer_list = decoder_blocks(ctx.model, target.param_name, target.meta.layer)
    sites = block_modules(ctx.model, len(layer_list))
    modules = [m for source in everything for m in source.channels] + \
        [name for kind in sites.values() for name in kind.values()]
    return Lab(ctx.model, first_blocks(ctx.data.evaluation, n_blocks), ctx.batch_size,
               ctx.job.ranks, layer_list, modules)


@contextmanager
def stage(ctx: AnalysisContext, lab: Lab, name: str):
    """A progress line when the stage is done (the evaluations it ran, its time)."""
    started, count = time.monotonic(), lab.evaluations
    yield
    if ctx.job.progress != "off":
        progress.line(f"mediation: {name} done ({lab.evaluations - count} evaluations, "
                      f"{time.monotonic() - started:.1f} s)")


def experiments(ctx: AnalysisContext, lab: Lab, singles, everything) -> dict:
    s = ctx.settings
    damaged, restored = {}, []
    with stage(ctx, lab, f"restore of {len(everything)} source(s)"):
        for source in everything:
            with lab.zeroed(source.selection):
                damaged[source.label] = lab.evaluate(source.layer)
                restored += restore(lab, source, damaged[source.label], s.spike_threshold)
    with stage(ctx, lab, "remove"):
        means = calibration_means(ctx.model, ctx.job.ranks, ctx.data.calibration,
                                  ctx.batch_size, [m for x in singles for m in x.channels])
        removed = [row for source in singles for row in remove(lab, source, means, ctx.seeds)]
    main = strongest(singles, damaged, lab.clean.nll)
    flow_rows, attribution = [], None
    if main is not None:
        with lab.zeroed(main.selection):
            replay = lab.damaged_replay()
            with stage(ctx, lab, f"flow of {main.label}"):
                flow_rows = flow(lab, main, replay, damaged[main.label])
            with stage(ctx, lab, "attribution patching"):
                attribution = atp.compare(lab, replay, damaged[main.label], main.layer,
                                          s.atp_exact, ctx.seeds[0])
    with stage(ctx, lab, "pairs"):
        pair_rows = pairs(lab, singles, damaged, ctx.seeds[0])
    return {"clean": lab.clean.summary(),
            "damaged": {label: result.summary() for label, result in damaged.items()},
            "main_source": None if main is None else main.label,
            "restore": restored, "remove": removed, "flow": flow_rows, "atp": attribution,
            "pairs": pair_rows}


def strongest(singles, damaged: dict, clean_nll: float):
    """The single source inside the decoder blocks whose zeroing raises the NLL most (None:
    no such source does, with a finite damage)."""
    damages = [(damaged[x.label].nll - clean_nll, i) for i, x in enumerate(singles)
               if x.layer is not None and damaged[x.label].nll - clean_nll > 0
               and damaged[x.label].nll < float("inf")]
    return singles[max(damages)[1]] if damages else None


def method(s, ctx: AnalysisContext, origin: str) -> dict:
    return {"sources_from": origin, "eval_blocks": min(s.mediation_eval_samples,
                                                      len(ctx.data.evaluation)),
            "single_weights": s.mediation_weights, "atp_exact": s.atp_exact,
            "spike_threshold": s.spike_threshold, "seeds": list(ctx.seeds),
            "damage": "the source's weights zeroed",
            "recovered_share": "(NLL damaged - NLL patched) / (NLL damaged - NLL clean); NLL = "
                               "mean per predicted token (nats)",
            "bootstrap": "percentile, 1000 resamples of the evaluation blocks, 95%"}


register(Analysis(
    key="mediation", flag="--mediation", run=run, settings=(MediationSettings,),
    reads=("spike_threshold", "super_weights"), prepare=check_model,
    enabled=lambda s: s.mediation, summary=present.summary_lines, findings=present.findings,
    files=present.write, plots={"mediation": present.plot},
    tables={"Mediation: restoring the activation": present.restore_table}))
