"""Hardware faults: --fault-injection (single-bit upset rates with intervals, injection.py) and
--bit-search (the fewest flips that break the model, search.py), on the weights' IEEE bits or on
round-to-nearest integer codes (--bit-format, src/sensitivity/bit_targets.py).

Both restore every weight bit-exactly (checked by a checksum of every weight) and write their
section to enhanced_analysis.json and to a JSON and CSV file of their own."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from src.analysis.faults import injection, present, search
from src.errors import UserError
from src.analysis.registry import Analysis, register
from src.sensitivity.bit_targets import FORMATS, check_bit, format_problem
from src.options import Settings, choice, integer, number, option

GROUP = "hardware faults"


def _faults(c) -> bool:
    return bool(c.value("fault_injection") or c.value("bit_search"))


@dataclass(frozen=True)
class FaultSettings(Settings):
    bit_format: str = option(
        "native", "bits that --fault-injection and --bit-search flip: native (IEEE-754 bits of "
        "the stored dtype), int8 or int4 (round-to-nearest codes with --quant-group, "
        "--quant-symmetric scales; the model evaluated dequantized)", group=GROUP,
        parse=choice(tuple(FORMATS)), used_when=("--fault-injection or --bit-search", _faults))
    fault_injection: int = option(
        0, "single-bit upsets drawn uniformly over all bits of the scored weights "
        "(--bit-position: one position), each evaluated alone and restored: critical rates "
        "with Wilson 95%% intervals per bit position, component and layer "
        "(fault_injection.json, .csv)", group=GROUP, parse=integer(0))
    fault_eval_samples: int = option(
        2, "--fault-injection: evaluation blocks each upset is measured on", group=GROUP,
        parse=integer(1), used_when=("--fault-injection", lambda c: c.value("fault_injection")))
    critical_ratio: float = option(
        2.0, "--fault-injection: an upset is critical when perplexity exceeds this times the "
        "baseline (or is not finite)", group=GROUP, parse=number(1.0),
        used_when=("--fault-injection", lambda c: c.value("fault_injection")))
    fault_margin: float = option(
        0.01, "--fault-injection: margin of error (95%% confidence) whose injection count is "
        "reported (Leveugle et al. 2009)", group=GROUP, parse=number(0.0, 1.0, low_open=True),
        used_when=("--fault-injection", lambda c: c.value("fault_injection")))
    bit_search: int = option(
        0, "progressive bit search (BFA): at most this many flips, each the one of the "
        "gradient's best candidates that raises the calibration batch's NLL most, against "
        "random flips and the top weights' MSB (bit_search.json, .csv)", group=GROUP,
        parse=integer(0))
    bit_search_target: float = option(
        100.0, "--bit-search: stop when the batch perplexity reaches this times its baseline",
        group=GROUP, parse=number(1.0, low_open=True),
        used_when=("--bit-search", lambda c: c.value("bit_search")))
    bit_search_eval_every: int = option(
        1, "--bit-search: evaluation perplexity every this many flips (and after the last)",
        group=GROUP, parse=integer(1), used_when=("--bit-search", lambda c: c.value("bit_search")))
    bit_search_candidates: int = option(
        8, "--bit-search: tensors whose best predicted flip is evaluated for real at each step",
        group=GROUP, parse=integer(1), used_when=("--bit-search", lambda c: c.value("bit_search")))

    def problems(self, config):
        if (self.fault_injection or self.bit_search) and config.shard:
            yield "--fault-injection and --bit-search do not run under --shard yet; run them " \
                  "without --shard (torchrun data parallel works)"
        bit = config.value("bit_position")
        if self.fault_injection and bit is not None:  # the stored dtype is checked once loaded
            problem = check_bit(bit, self.bit_format, config.quant_symmetric, [torch.float32])
            if problem:
                yield problem


READS = ("quant_group", "quant_symmetric", "bit_position")


def check_weights(settings, preflight) -> None:
    """Before the run: the weights have bits of this format and --bit-position names one."""
    dtypes = [p.dtype for p in preflight.params.values()]
    problem = format_problem(settings.bit_format, dtypes)
    if problem is None and settings.bit_position is not None:
        problem = check_bit(settings.bit_position, settings.bit_format, settings.quant_symmetric,
                            dtypes)
    if problem:
        raise UserError(problem)


register(Analysis(
    key="fault_injection", flag="--fault-injection", run=injection.run,
    settings=(FaultSettings,), reads=READS, prepare=check_weights,
    enabled=lambda s: s.fault_injection > 0, summary=present.injection_lines,
    findings=present.injection_findings, files=present.write_injection,
    plots={"fault_injection_rates": present.plot_rates},
    tables={"Fault injection: critical rate per bit position": present.bit_table}))

register(Analysis(
    key="bit_search", flag="--bit-search", run=search.run,
    settings=(FaultSettings,), reads=READS, prepare=check_weights,
    enabled=lambda s: s.bit_search > 0, summary=present.search_lines,
    findings=present.search_findings, files=present.write_search,
    plots={"bit_search_curve": present.plot_search},
    tables={"Bit search: flips committed": present.search_table}))
