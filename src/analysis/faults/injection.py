"""--fault-injection N: statistical fault injection of single-bit upsets.

N independent upsets are drawn uniformly over all bits of the scored weights in the run's
--bit-format (--bit-position: one position of every weight), seeded by the run's first seed.
Each is applied alone, the first --fault-eval-samples evaluation blocks measured (in one batch;
the decoder blocks before the upset's own are replayed from a recording, src/eval/replay.py:
exact, and about half the work), and the bit restored. An upset is *critical* when the perplexity exceeds --critical-ratio times the baseline
of the same blocks in the same format, or is not finite. An upset that leaves the stored bits as
they were (an integer code in a group of scale 0) is counted without evaluation: it cannot change
anything.

Rates: the critical fraction with a Wilson 95% interval overall and per bit position, component
and layer. Sample size (Leveugle et al., DATE 2009): the injections that a margin of error e
needs at 95% confidence over a population of N bits, n = N / (1 + e²(N - 1) / (t² p(1 - p))),
t = 1.96, for p = 0.5 (the worst case) and for the observed rate; and the margin the run's own
count gives, e = t·sqrt(p(1 - p)/n · (N - n)/(N - 1)) at p = 0.5.
"""
from __future__ import annotations

import math
import time

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from src.analysis.context import AnalysisContext
from src.analysis.faults.flips import (first_blocks, flip_row, measurer, population_bits,
                                       same_bits, uniform_flips, applied, value_change)
from src.eval.replay import LayerReplay, decoder_blocks
from src.sensitivity.bit_targets import held_as, quant_spec
from src.sensitivity.perturb import fingerprint
from src.utils import progress
from src.utils.format import sig

CONFIDENCE = 0.95
GROUPS = ("bit", "component", "layer")
PROGRESS_LINES = 10  # progress lines per run when the log is a file


def run(ctx: AnalysisContext) -> dict:
    s = ctx.settings
    blocks = first_blocks(ctx.data.evaluation, s.fault_eval_samples)
    float_baseline = measurer(ctx.model, blocks, len(blocks), ctx.job.ranks)()
    reference = fingerprint(ctx.params)
    spec = quant_spec(s.bit_format, s.quant_group, s.quant_symmetric)
    with held_as(ctx.params, ctx.metas, s.bit_format, spec) as targets:
        replay = LayerReplay(ctx.model, blocks, len(blocks), decoder_list(ctx), ctx.job.ranks)
        baseline = replay.baseline
        flips = uniform_flips(targets, s.fault_injection, ctx.seeds[0], s.bit_position)
        rows = inject(ctx, targets, flips, replay, baseline.perplexity)
        population = population_bits(targets, s.bit_position)
    restored = fingerprint(ctx.params) == reference
    critical = np.array([r["critical"] for r in rows], dtype=bool)
    return {"bit_format": s.bit_format, "quantization": None if spec is None else spec.label,
            "bit_position": s.bit_position, "n_injections": len(rows),
            "n_evaluated": sum(r["evaluated"] for r in rows),
            "eval_blocks": len(blocks), "critical_ratio": s.critical_ratio,
            "seed": ctx.seeds[0], "float_baseline": float_baseline.summary(),
            "baseline": baseline.summary(), "population_bits": population,
            "overall": rate_row("all", critical),
            "by": {group: rates_by(rows, group) for group in GROUPS},
            "sample_size": sample_size(population, s.fault_margin, len(rows),
                                       float(critical.mean()) if len(rows) else math.nan),
            "injections": rows, "restore_verified": restored}


def decoder_list(ctx: AnalysisContext):
    """The decoder blocks of the scored weights that lie in numbered blocks (None: no scored
    weight does, and every upset is evaluated in full)."""
    name = next((n for n, meta in ctx.metas.items() if meta.layer is not None), None)
    return None if name is None else decoder_blocks(ctx.model, name, ctx.metas[name].layer)


def replayed_from(ctx: AnalysisContext, replay: LayerReplay, name: str) -> int | None:
    """The first block a change of weight ``name`` can reach (None: before every block)."""
    layer = ctx.metas[name].layer
    if layer is None or replay.layer_list is None or \
            decoder_blocks(ctx.model, name, layer) is not replay.layer_list:
        return None
    return layer


def inject(ctx: AnalysisContext, targets: dict, flips, replay: LayerReplay,
           baseline_ppl: float) -> list[dict]:
    """Every upset alone, measured (the blocks before its own replayed) and restored."""
    rows, n_critical, started = [], 0, time.monotonic()
    bar = tqdm(flips, desc="fault injection", disable=not ctx.progress, leave=False)
    every = max(1, len(flips) // PROGRESS_LINES)
    for number, flip in enumerate(bar, 1):
        before, after = value_change(targets, flip)
        evaluated = not same_bits(before, after)
        if evaluated:
            with applied(targets, [flip]):
                perplexity = replay.evaluate_from(replayed_from(ctx, replay, flip.name)).perplexity
        else:
            perplexity = baseline_ppl
        ratio = perplexity / baseline_ppl
        critical = not math.isfinite(perplexity) or ratio > ctx.settings.critical_ratio
        n_critical += critical
        rows.append({"injection": number - 1, **flip_row(flip, ctx.metas, float(before),
                                                          float(after)),
                     "evaluated": evaluated, "perplexity": perplexity, "ppl_ratio": ratio,
                     "critical": critical})
        bar.set_postfix_str(f"critical {n_critical}/{number} = {n_critical / number:.2%}")
        if ctx.job.progress == "lines" and (number % every == 0 or number == len(flips)):
            progress.line(f"fault injection: {number}/{len(flips)} upsets, {n_critical} critical "
                          f"({n_critical / number:.2%}), {sig(time.monotonic() - started)} s")
    return rows


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (``CONFIDENCE``)."""
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def rate_row(value, critical: np.ndarray) -> dict:
    k, n = int(critical.sum()), int(critical.size)
    low, high = wilson(k, n) if n else (math.nan, math.nan)
    return {"value": value, "n": n, "critical": k, "rate": k / n if n else math.nan,
            "ci_low": low, "ci_high": high}


def rates_by(rows: list[dict], key: str) -> list[dict]:
    """A rate row per distinct value of ``key`` (bit position, component, layer), sorted."""
    values = sorted({r[key] for r in rows}, key=lambda v: (v is None, v if v is not None else 0))
    return [rate_row(value, np.array([r["critical"] for r in rows if r[key] == value], dtype=bool))
            for value in values]


def sample_size(population: int, margin: float, n_run: int, observed: float) -> dict:
    """Leveugle et al. (2009): injections needed for ``margin`` at 95% confidence, and the
    margin that ``n_run`` injections give (worst case p = 0.5)."""
    t = float(stats.norm.ppf(0.5 + CONFIDENCE / 2))

    def needed(p: float) -> int | None:
        if not 0 < p < 1:
            return None
        return math.ceil(population / (1 + margin ** 2 * (population - 1) / (t * t * p * (1 - p))))

    achieved = t * math.sqrt(0.25 / n_run * (population - n_run) / max(population - 1, 1)) \
        if n_run else math.nan
    return {"margin": margin, "confidence": CONFIDENCE, "population_bits": population,
            "needed_worst_case": needed(0.5), "needed_at_observed_rate": needed(observed),
            "margin_of_this_run": achieved}
