#!/usr/bin/env python3
"""scripts/benchmark.py: throughput of the tool's hot paths against the same model's bare ceilings, in one process.

Figures (each timed after one untimed warm-up call, then ``--repeats`` timed calls with
``torch.cuda.synchronize`` around each; a figure's ``seconds`` is their median, ``spread``
(slowest - fastest) / median, ``seconds_min`` / ``seconds_max`` / ``seconds_repeats`` the rest):

* ``forward``           bare ``model(input_ids, attention_mask)`` under inference mode: the ceiling
                        for evaluation and ``act_mag``.
* ``forward_backward``  bare forward+backward, the work no gradient metric avoids: the
                        calibration loss (``loss_sum``, the metrics' own), gradients of exactly
                        the scored weights (requires_grad off elsewhere) accumulated into
                        ``.grad`` buffers allocated once per call, outside the timing, and kept
                        across its steps (src/bench/reference.py): the ceiling for the gradient
                        metrics and Hutchinson.
* ``score_<metric>``    ``compute_scores`` for every metric in ``METRICS`` on the same blocks
                        (``hutchinson_diag`` with one probe per batch: its ratio is the cost of one
                        probe, first-order graph included, per token, relative to one fwd+bwd;
                        a derived metric, e.g. ``obd``, its base's pass and its derivation).
* ``evaluate``          ``src.eval.perplexity.evaluate`` (NLL, accuracy, per-block sums).
* ``topk_global`` / ``topk_per_tensor``  ``rank.top_k`` over every scored weight's scores
                        (``--rank-metric`` on the warm-up batch).
* ``perturb_restore``   ``perturbed(..., "sign_flip")`` of the K globally selected weights and
                        their exact restore.
* ``quantize_rtn``      round-to-nearest (``--quant-bits``, groups of 128) of every scored weight,
                        written back in place (the compression experiment's cost per condition).

Throughput is tokens per second over ``--steps`` batches of ``--batch-size`` x ``--max-length``
random token ids. A figure with a ceiling is timed in rounds with it, one call of each per round,
so both meet the same load of a shared machine: ``ratio`` is the median over the rounds of the
figure's tokens/s / the ceiling's tokens/s (1.0 = no overhead over the bare model),
``ratio_spread`` their (largest - smallest) / median, ``ceiling_seconds_repeats`` the ceiling's
seconds in those rounds. Peak memory per figure: CUDA max allocated (largest over visible GPUs), else the
process's peak RSS (reset per figure where Linux allows it, else the running peak).

``--estimate-memory``: no timing; each figure's device peak memory estimated from the same passes
on a fake model, without a GPU (src/bench/estimate.py).

Example: python scripts/benchmark.py --model random:llama-3.1-8b --dtype bfloat16 \\
             --batch-size 8 --max-length 512 --json results/bench.json
"""
