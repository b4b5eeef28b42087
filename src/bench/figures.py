"""The benchmark's figures: bare ceilings, every metric, evaluation, ranking, perturbation and
quantization, each timed in the same process (src/bench/__init__.py)."""
from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch

from src.bench.measure import (PeakMemory, Work, paired_ratio, random_blocks, repeat_summary,
                               timed_rounds)
from src.bench.reference import gradient_step, scored_gradients_kept
from src.eval.perplexity import evaluate
from src.models.components import describe_parameters
from src.models.properties import input_device
from src.sensitivity.hutchinson import HutchinsonSettings, uses_hutchinson
from src.sensitivity.metrics import METRICS, compute_scores
from src.sensitivity.perturb import perturbed
from src.sensitivity.quantize import QuantSpec, quantize_stored
from src.sensitivity.rank import top_k
from src.sensitivity.scoring import ScoringJob
from src.distributed.ranks import Ranks
from src.distributed.sharding import without_grad

# Which bare ceiling each scoring metric is compared with (default: forward_backward).
FORWARD_ONLY_METRICS = {"act_mag"}
CEILINGS = ("forward", "forward_backward")


def hutchinson_variants(metric: str, hvp: str, sharded: bool) -> list[tuple[str, str]]:
    """(figure name, HVP) of the figures of a metric that ``uses_hutchinson``: ``auto`` gives
    both Hessian-vector products in one process (finite differences only under --shard, where
    double backward does not run); the double backward's figure keeps the name score_<metric>."""
    if hvp == "auto":
        hvps = ["finite_difference"] if sharded else ["double_backward", "finite_difference"]
    else:
        hvps = [hvp]
    return [(f"score_{metric}" if h == "double_backward" or len(hvps) == 1
             else f"score_{metric}_{h}", h) for h in hvps]


@dataclass(frozen=True)
class Ceiling:
    """A ceiling's work, timed again beside every figure compared with it."""
    work: Work
    tokens: int


class Bench:
    """``ranks`` (src.distributed.ranks.Ranks; sharded: benchmark --shard): every rank times ``--steps`` batches
    of its own; each repeat's seconds are the slowest rank's and a figure's tokens all ranks'
    tokens."""

    def __init__(self, model, params, args, memory: PeakMemory, ranks: Ranks = Ranks()):
        self.model, self.params, self.args, self.memory = model, params, args, memory
        self.ranks = ranks
        self.world = ranks.world_size
        vocab = model.get_input_embeddings().num_embeddings
        n = args.batch_size * args.steps * self.world
        self.blocks = random_blocks(n, args.max_length, vocab, seed=1)
        self.warm_blocks = random_blocks(args.batch_size * self.world, args.max_length, vocab,
                                         seed=2)
        self.tokens = n * args.max_length
        self.figures: dict[str, dict] = {}
        self.ceilings: dict[str, Ceiling] = {}
        # Hutchinson one transformer block at a time: --hutchinson-mode block, or auto after
        # the whole model ran out of memory
        self.hutchinson_block = args.hutchinson_mode == "block"
        self.main = ranks.is_main

    def record(self, name: str, fn, warm_data=None, data=None, *, tokens: int | None = None,
               ceiling: str | None = None, note: str = "", around=nullcontext) -> dict:
        """Time ``fn(data)`` (see measure.Work) and keep its figure. A figure with a ratio is
        timed in rounds with its ceiling (one call of each per round) and its ratio is the
        median of the rounds' ratios."""
        work, peaks = Work(fn, data, warm_data, around), []
        self.memory.reset()
        paired = self.ceilings.get(ceiling) if tokens else None
        measured = replace(work, around=partial(self._peak_memory, peaks, around))
        try:
            *ceiling_seconds, seconds = self._timed([paired.work, measured] if paired
                                                    else [measured])
        except torch.cuda.OutOfMemoryError as error:
            return self._out_of_memory(name, error, note)
        timing = repeat_summary(seconds)
        figure = {**timing, "tokens": tokens,
                  "tokens_per_s": tokens / timing["seconds"] if tokens else None,
                  "ceiling": ceiling, "ratio": None, "ratio_spread": None,
                  "cost_x_ceiling": None, "peak_memory_bytes": max(peaks), "note": note}
        if paired:
            figure.update(paired_ratio(tokens, seconds, paired.tokens, ceiling_seconds[0]))
        if name in CEILINGS:
            self.ceilings[name] = Ceiling(work, tokens)
        self.figures[name] = figure
        if self.main:
            print(f"[bench] {name}: {figure['seconds']:.4f} s (spread {figure['spread']:.1%})" +
                  (f", {figure['tokens_per_s']:.1f} tok/s" if tokens else "") +
                  (f", ratio {figure['ratio']:.3f} (spread {figure['ratio_spread']:.1%}) vs "
                   f"{ceiling}" if paired else ""), flush=True)
        return figure

    def _timed(self, works: list[Work]) -> list[list[float]]:
        """timed_rounds; under --shard each round's seconds are the slowest rank's."""
        seconds = timed_rounds(works, self.args.repeats, self.args.clock)
        if not self.ranks.distributed:
            return seconds
        every_rank = self.ranks.all_gather_objects(seconds)
        return [[max(ranks) for ranks in zip(*work_seconds)] for work_seconds in zip(*every_rank)]

    @contextmanager
    def _peak_memory(self, peaks: list[int], around):
        """``around()`` with this process's peak memory of the call appended to ``peaks``."""
        self.memory.reset_peak()
        with around():
            yield
        peaks.append(self.memory.peak_bytes())

    def _out_of_memory(self, name: str, error, note: str) -> dict:
        figure = {"error": f"out of memory: {str(error).splitlines()[0][:160]}",
                  "peak_memory_bytes": self.memory.peak_bytes(), "note": note}
        self.figures[name] = figure
        gc.collect()
        torch.cuda.empty_cache()
        print(f"[bench] {name}: OUT OF MEMORY", flush=True)
        return figure

    def batches(self, blocks):
        """This process's batches of ``blocks`` (under --shard its share)."""
        device = input_device(self.model)
        n_batches = len(blocks) // self.args.batch_size
        mine = self.ranks.my_batches(n_batches)
        return [blocks.batch(index, self.args.batch_size, device) for index in mine]

    def forward(self):
        batches, warm = self.batches(self.blocks), self.batches(self.warm_blocks)

        def run(items):
            with without_grad(self.ranks.sharded):
                for ids, mask in items:
                    self.model(input_ids=ids, attention_mask=mask)

        self.record("forward", run, warm, batches, tokens=self.tokens,
                    note="bare model forward, inference mode")

    def forward_backward(self):
        batches, warm = self.batches(self.blocks), self.batches(self.warm_blocks)

        def run(items):
            for ids, mask in items:
                gradient_step(self.model, ids, mask)

        self.record("forward_backward", run, warm, batches, tokens=self.tokens,
                    around=partial(scored_gradients_kept, self.model, self.params),
                    note="bare forward+backward: calibration loss, gradients of the scored "
                         "weights only, accumulated into buffers kept across steps")

    def metric(self, metric: str):
        """The metric's scoring figure; a Hutchinson metric once per Hessian-vector product
        that can run here (``--hutchinson-hvp auto``: both in one process, as the estimate)."""
        if not uses_hutchinson(metric):
            self.scoring_figure(metric, f"score_{metric}")
            return
        for name, hvp in hutchinson_variants(metric, self.args.hutchinson_hvp,
                                             self.ranks.sharded):
            self.scoring_figure(metric, name, hvp)

    def scoring_figure(self, metric: str, name: str, hvp: str = "auto"):
        args = self.args
        uses_data = METRICS[metric].uses_data
        batch_size = args.batch_size
        blocks, warm = self.blocks, self.warm_blocks
        note = "" if uses_data else "no data: seconds for all scored weights"
        if args.gradient_checkpointing and METRICS[metric].gradients:
            note = "gradient checkpointing; " + note
        if uses_hutchinson(metric):
            batch_size = args.hutchinson_batch_size or args.batch_size
            vocab = self.model.get_input_embeddings().num_embeddings
            blocks = random_blocks(batch_size * args.steps, args.max_length, vocab, seed=3)
            warm = random_blocks(batch_size, args.max_length, vocab, seed=4)
            note = (f"1 probe per batch of {batch_size}, {hvp}, "
                    + ("block mode (one pass per transformer block)" if self.hutchinson_block
                       else "whole model") + f", moments {args.hutchinson_moments}; "
                    "cost_x_ceiling = cost of one probe per token in fwd+bwd units")
        ceiling = "forward" if metric in FORWARD_ONLY_METRICS else "forward_backward"

        def run(data):  # the scores are dropped at once: no call holds another's in memory
            compute_scores(self.scoring_job(data, batch_size, hvp), metric)

        tokens = len(blocks) * args.max_length if uses_data else None
        figure = self.record(name, run, warm, blocks, tokens=tokens,
                             ceiling=ceiling if uses_data else None, note=note)
        if "error" in figure and uses_hutchinson(metric) and not self.hutchinson_block \
                and args.hutchinson_mode == "auto":
            print(f"[bench] {name}: whole-model mode ran out of memory; block mode", flush=True)
            self.hutchinson_block = True
            self.scoring_figure(metric, name, hvp)
            self.hutchinson_block = False

    def evaluate(self):
        self.record("evaluate", lambda data: evaluate(self.model, data, self.args.batch_size,
                                                      ranks=self.ranks),
                    self.warm_blocks, self.blocks, tokens=self.tokens, ceiling="forward",
                    note="NLL, accuracy, per-block sums")

    def scoring_job(self, data, batch_size: int, hvp: str = "auto") -> ScoringJob:
        """A scoring job on ``data`` (Hutchinson: one probe per batch, by ``hvp``)."""
        hutchinson = HutchinsonSettings(hutchinson_samples=1,
                                        hutchinson_block=self.hutchinson_block,
                                        hutchinson_hvp=hvp,
                                        hutchinson_moments=self.args.hutchinson_moments)
        return ScoringJob(self.model, self.params, data, batch_size=batch_size, seed=0,
                          settings={HutchinsonSettings: hutchinson}, ranks=self.ranks,
                          gradient_checkpointing=self.args.gradient_checkpointing)

    def ranking_and_perturbation(self):
        """Top-K and perturbation of scores of ``--rank-metric`` on the warm-up batch
        (magnitude if that metric's figure ran out of memory)."""
        metric = self.args.rank_metric
        if "error" in self.figures.get(f"score_{metric}", {}):
            metric = "magnitude"
        scores = compute_scores(self.scoring_job(self.warm_blocks, self.args.batch_size),
                                metric).scores
        n_weights = sum(s.numel() for s in scores.values())
        k = self.args.topk
        selection = {}

        def global_top(_):
            selection["global"] = top_k(scores, k, "global")

        self.record("topk_global", global_top,
                    note=f"exact global top-{k} of {n_weights} weights ({metric})")
        self.record("topk_per_tensor", lambda _: top_k(scores, k, "per_tensor"),
                    note=f"top-{k} in each of {len(scores)} tensors")

        def flip(_):
            with perturbed(self.params, selection["global"], "sign_flip"):
                pass

        self.record("perturb_restore", flip, note=f"sign_flip of {k} weights and exact restore")

    def quantization(self):
        """Round-to-nearest of every scored weight, tensor by tensor, written back in place
        (the originals restored after each timing, outside it)."""
        spec = QuantSpec(self.args.quant_bits, 128)
        metas = describe_parameters(self.model, self.params)
        n_weights = sum(p.numel() for p in self.params.values())

        def quantize_all(_):
            with torch.no_grad():
                for name, p in self.params.items():
                    p.data.copy_(quantize_stored(p, metas[name], spec, None))

        originals = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        try:
            self.record("quantize_rtn", quantize_all,
                        note=f"{spec.label} of all {n_weights} scored weights")
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.data.copy_(originals[name].to(p.device))
