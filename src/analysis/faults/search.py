"""--bit-search N: the fewest bit flips that break the model, by progressive bit search (in the
manner of BFA, Rakin et al., ICCV 2019), on the weights held in the run's --bit-format.

The attacker's batch: the first --batch-size calibration blocks. Each step:

1. the gradient g of the batch's token-mean NLL at the current (already flipped) weights;
2. every bit of every scored weight is ranked by the first-order loss change its flip would
   cause, g·(w' - w), with w' the value after the flip (IEEE: the flipped float, a non-finite
   w' ranking first; codes: ±2^b·scale, the dequantized change before rounding to the dtype);
   each tensor proposes its best flip (a bit already flipped is not proposed again);
3. the --bit-search-candidates tensors with the largest proposals have them evaluated for real
   on the batch (evaluating every tensor's would cost one forward per tensor per step);
4. the flip that raises the batch NLL most is committed (a non-finite NLL counts as infinite).

It stops after N flips or when the batch perplexity reaches --bit-search-target times its
baseline. Evaluation perplexity (the run's evaluation blocks) is measured every
--bit-search-eval-every flips and after the last. Controls on the same format, flips undone
first: uniform random flips of the same counts (per seed; the counts at which the search first
reached 2x, 10x, 100x and its final count), and the most damaging bit (exponent MSB; a code's
MSB) of the global top-N weights of the run's metric. Every flip is undone at the end and a
checksum of every weight compared with its value before.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from src.analysis.context import AnalysisContext
from src.analysis.faults.flips import (Flip, FlipStack, applied, first_blocks, flip_row,
                                       measurer, uniform_flips, value_change)
from src.sensitivity.bit_targets import held_as, quant_spec
from src.sensitivity.perturb import fingerprint
from src.sensitivity.rank import top_k
from src.sensitivity.weight_metrics import mean_gradient
from src.utils import progress
from src.utils.format import sig

THRESHOLDS = (2.0, 10.0, 100.0)


def run(ctx: AnalysisContext) -> dict:
    s = ctx.settings
    batch = first_blocks(ctx.job.blocks, ctx.batch_size)
    job = dataclasses.replace(ctx.job, blocks=batch, progress="off")
    on_batch = measurer(ctx.model, batch, ctx.batch_size, ctx.job.ranks)
    float_batch = on_batch()
    reference = fingerprint(ctx.params)
    spec = quant_spec(s.bit_format, s.quant_group, s.quant_symmetric)
    with held_as(ctx.params, ctx.metas, s.bit_format, spec) as targets:
        batch_baseline = float_batch if spec is None else on_batch()
        evaluation = ctx.baseline if spec is None else ctx.evaluate()
        with FlipStack(targets) as stack:
            steps = search(ctx, targets, stack, job, on_batch, batch_baseline.nll,
                           evaluation.perplexity)
        n_flips = len(steps)
        reached = flips_to(steps, evaluation.perplexity)
        counts = sorted({n for n in reached.values() if n} | ({n_flips} if n_flips else set()))
        random = random_controls(ctx, targets, counts, evaluation.perplexity)
        msb = msb_control(ctx, targets, n_flips, evaluation.perplexity) if n_flips else None
    return {"bit_format": s.bit_format, "quantization": None if spec is None else spec.label,
            "max_flips": s.bit_search, "target_ratio": s.bit_search_target,
            "candidates": s.bit_search_candidates, "batch_blocks": len(batch),
            "float_baseline": ctx.baseline.summary(), "baseline": evaluation.summary(),
            "float_batch_baseline": float_batch.summary(), "batch_baseline": batch_baseline.summary(),
            "n_flips": n_flips, "stopped": stop_reason(steps, s), "flips_to": reached,
            "steps": steps, "random_flips": random, "top_metric_msb": msb,
            "touched": sorted({r["parameter"] for r in steps}),
            "restore_verified": fingerprint(ctx.params) == reference}


def search(ctx, targets, stack: FlipStack, job, on_batch, baseline_nll: float,
           eval_baseline_ppl: float) -> list[dict]:
    s = ctx.settings
    steps, done = [], set()
    bar = tqdm(range(1, s.bit_search + 1), desc="bit search", disable=not ctx.progress,
               leave=False)
    for step in bar:
        gradient = mean_gradient(job)
        proposals = propose(targets, gradient, done, s.bit_search_candidates)
        del gradient
        if not proposals:
            break
        flip, predicted, nll = strongest(targets, proposals, on_batch)
        before, after = value_change(targets, flip)
        stack.push(flip)
        done.add(flip)
        ratio = math.exp(min(nll - baseline_nll, 700.0)) if math.isfinite(nll) else math.inf
        row = {"step": step, **flip_row(flip, ctx.metas, float(before), float(after)),
               "predicted_delta_nll": predicted, "batch_nll": nll, "batch_ppl_ratio": ratio,
               "eval_perplexity": None, "eval_ppl_ratio": None}
        last = step == s.bit_search or ratio >= s.bit_search_target
        if step % s.bit_search_eval_every == 0 or last:
            perplexity = ctx.evaluate().perplexity
            row.update(eval_perplexity=perplexity, eval_ppl_ratio=perplexity / eval_baseline_ppl)
        steps.append(row)
        bar.set_postfix_str(f"batch ppl x{sig(ratio)}")
        if ctx.job.progress == "lines":
            progress.line(f"bit search: flip {step} {flip.name}[{flip.index}] bit {flip.bit}: "
                          f"batch perplexity x{sig(ratio)}")
        if last:
            break
    return steps


def propose(targets: dict, gradient: dict, done: set, n: int) -> list[tuple[Flip, float]]:
    """Each tensor's flip of largest predicted NLL change g·(w' - w); the ``n`` largest."""
    proposals = []
    with torch.no_grad():
        for name, target in targets.items():
            flip, gain = best_flip(name, target, gradient[name].reshape(-1),
                                   [f for f in done if f.name == name])
            if gain > -math.inf:
                proposals.append((flip, gain))
    proposals.sort(key=lambda p: -p[1])
    return proposals[:n]


def best_flip(name: str, target, g: torch.Tensor, done: list[Flip]) -> tuple[Flip, float]:
    """The flip of one tensor with the largest g·(w' - w) (non-finite w': +inf), none of
    ``done``. Bits are tried in order of the largest gain they can reach (``gain_bounds``); a
    bit whose bound cannot beat the best so far is skipped: the result is the same, and most
    bits of most tensors need no pass."""
    bounds = target.gain_bounds(g)
    best = (-math.inf, 0, 0)  # gain, index, bit
    for bit in sorted(range(target.n_bits), key=lambda b: -bounds[b]):
        if best[0] > -math.inf and bounds[bit] <= best[0]:
            continue
        change = target.changes(bit)
        gain = change * g
        gain.masked_fill_(~torch.isfinite(change), math.inf)
        gain.nan_to_num_(nan=-math.inf)
        for flip in done:
            if flip.bit == bit:
                gain[flip.index] = -math.inf
        index = int(gain.argmax())
        if float(gain[index]) > best[0]:
            best = (float(gain[index]), index, bit)
    return Flip(name, best[1], best[2]), best[0]


def strongest(targets: dict, proposals, on_batch) -> tuple[Flip, float, float]:
    """(flip, its predicted change, the batch NLL under it) of the proposal whose real batch NLL
    is largest (non-finite = infinite; the first of equals)."""
    best = None
    for flip, predicted in proposals:
        with applied(targets, [flip]):
            nll = on_batch().nll
        loss = nll if math.isfinite(nll) else math.inf
        if best is None or loss > best[2]:
            best = (flip, predicted, loss)
        if loss == math.inf:
            break
    return best


def flips_to(steps: list[dict], eval_baseline_ppl: float) -> dict:
    """Per threshold ("2x", "10x", "100x"): the first flip count at which the evaluation
    perplexity (where measured) reached it, or None."""
    reached = {}
    for threshold in THRESHOLDS:
        hit = next((r["step"] for r in steps if r["eval_ppl_ratio"] is not None and
                    r["eval_ppl_ratio"] >= threshold), None)
        reached[f"{threshold:g}x"] = hit
    return reached


def stop_reason(steps: list[dict], s) -> str:
    if steps and steps[-1]["batch_ppl_ratio"] >= s.bit_search_target:
        return "target"
    return "max_flips" if len(steps) == s.bit_search else "no_candidates"


def random_controls(ctx, targets, counts: list[int], baseline_ppl: float) -> list[dict]:
    """Uniform random flips of each count, one draw per seed, evaluated like the search."""
    rows = []
    for count in counts:
        perplexities = []
        for seed in ctx.seeds:
            with applied(targets, uniform_flips(targets, count, seed)):
                perplexities.append(ctx.evaluate().perplexity)
        finite = np.array(perplexities, dtype=float)
        rows.append({"n_flips": count, "seeds": list(ctx.seeds), "perplexity": perplexities,
                     "ppl_ratio": [p / baseline_ppl for p in perplexities],
                     "mean_perplexity": float(finite.mean()),
                     "sd_perplexity": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0})
    return rows


def msb_control(ctx, targets, n: int, baseline_ppl: float) -> dict:
    """The most damaging bit of each of the global top-``n`` weights of the run's metric."""
    selection = top_k(ctx.scores, n, "global")
    flips = [Flip(name, int(i), targets[name].most_damaging_bit)
             for name, idx in selection.items() for i in idx.tolist()]
    with applied(targets, flips):
        perplexity = ctx.evaluate().perplexity
    return {"metric": ctx.metric, "n_flips": len(flips), "perplexity": perplexity,
            "ppl_ratio": perplexity / baseline_ppl}
