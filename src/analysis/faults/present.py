"""What --fault-injection and --bit-search show: files, console lines, report sentences, tables
and plots."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from src.utils.format import sig, times
from src.utils.io import write_json


def _pct(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def rate_text(row: dict) -> str:
    """A rate row as "1.23% [0.90%, 1.70%]" (Wilson 95%)."""
    return f"{_pct(row['rate'])} [{_pct(row['ci_low'])}, {_pct(row['ci_high'])}]"


def format_label(section: dict) -> str:
    return section["bit_format"] + (f" ({section['quantization']})"
                                    if section["quantization"] else "")


# ----------------------------------------------------------------------------- fault injection

def write_injection(section: dict, out_dir) -> list[str]:
    write_json(out_dir / "fault_injection.json", section)
    pd.DataFrame(section["injections"]).to_csv(out_dir / "fault_injection.csv", index=False)
    return ["fault_injection.json", "fault_injection.csv"]


def injection_headline(section: dict) -> str:
    overall = section["overall"]
    return (f"{overall['critical']} of {overall['n']} single-bit upsets in {format_label(section)} "
            f"weights are critical (perplexity > {sig(section['critical_ratio'])}x the baseline "
            f"{sig(section['baseline']['perplexity'])}): {rate_text(overall)} (Wilson 95%)")


def injection_lines(section: dict) -> list[str]:
    lines = ["fault injection: " + injection_headline(section)]
    worst = sorted(section["by"]["bit"], key=lambda r: -r["rate"])[:4]
    lines += [f"  bit {r['value']}: {rate_text(r)} of {r['n']}" for r in worst]
    size = section["sample_size"]
    lines.append(f"  margin ±{_pct(size['margin'])} needs {size['needed_worst_case']} "
                 f"injections (worst case); this run's {section['n_injections']} give "
                 f"±{_pct(size['margin_of_this_run'])}")
    if not section["restore_verified"]:
        lines.append("  WARNING: weights not restored bit-exactly")
    return lines


def injection_findings(section: dict) -> list[str]:
    out = [f"Fault injection: {injection_headline(section)}."]
    if section["quantization"]:
        out.append(f"The {section['quantization']} model's baseline perplexity on these blocks "
                   f"is {sig(section['baseline']['perplexity'])} against "
                   f"{sig(section['float_baseline']['perplexity'])} in floating point.")
    hit = [r for r in section["by"]["bit"] if r["critical"]]
    if hit:
        out.append("Critical upsets hit bit positions " + ", ".join(
            f"{r['value']} ({rate_text(r)})" for r in sorted(hit, key=lambda r: -r["rate"])[:4])
            + "; every other position had none.")
    components = [r for r in section["by"]["component"] if r["critical"]]
    if components:
        top = max(components, key=lambda r: r["rate"])
        out.append(f"Most vulnerable component: {top['value']} ({rate_text(top)} of "
                   f"{top['n']} upsets).")
    size = section["sample_size"]
    out.append(f"A ±{_pct(size['margin'])} margin at 95% confidence needs "
               f"{size['needed_worst_case']} injections in the worst case"
               + (f", {size['needed_at_observed_rate']} at the observed rate"
                  if size["needed_at_observed_rate"] else "")
               + f" (Leveugle et al. 2009; {size['population_bits']} bits).")
    return out


def bit_table(section: dict) -> list[dict]:
    return [{"bit": r["value"], "upsets": r["n"], "critical": r["critical"],
             "rate": _pct(r["rate"]), "95% interval": f"[{_pct(r['ci_low'])}, "
                                                     f"{_pct(r['ci_high'])}]"}
            for r in section["by"]["bit"]]


def plot_rates(section: dict):
    from src.plots.style import PALETTE, plt

    rows = section["by"]["bit"]
    bits = [r["value"] for r in rows]
    rates = np.array([r["rate"] for r in rows]) * 100
    low = rates - np.array([r["ci_low"] for r in rows]) * 100
    high = np.array([r["ci_high"] for r in rows]) * 100 - rates
    figure, ax = plt.subplots(figsize=(max(6, 0.3 * len(bits) + 2), 4.5))
    ax.bar([str(b) for b in bits], rates, yerr=[low, high], capsize=2, color=PALETTE[0],
           ecolor="0.3")
    overall = section["overall"]
    ax.axhline(100 * overall["rate"], color="0.5", linestyle="--", linewidth=0.8,
               label=f"all bits: {rate_text(overall)}")
    ax.set_xlabel("bit position (0 = least significant)")
    ax.set_ylabel("critical upsets (%), Wilson 95% interval")
    ax.set_title(f"Single-bit upsets in {format_label(section)} weights "
                 f"(critical: ppl > {sig(section['critical_ratio'])}x)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------- bit search

def write_search(section: dict, out_dir) -> list[str]:
    write_json(out_dir / "bit_search.json", section)
    pd.DataFrame(section["steps"]).to_csv(out_dir / "bit_search.csv", index=False)
    return ["bit_search.json", "bit_search.csv"]


def search_headline(section: dict) -> str:
    last = section["steps"][-1] if section["steps"] else None
    if last is None:
        return f"bit search in {format_label(section)}: no flip committed"
    final = last["eval_ppl_ratio"]
    reached = ", ".join(f"{k} after {v}" for k, v in section["flips_to"].items() if v)
    text = (f"bit search in {format_label(section)}: {section['n_flips']} flips ({section['stopped']}) "
            f"raise evaluation perplexity {times(final)}")
    return text + (f" ({reached} flips)" if reached else "")


def _random_text(section: dict) -> str:
    if not section["random_flips"]:
        return ""
    last = section["random_flips"][-1]
    ratio = last["mean_perplexity"] / section["baseline"]["perplexity"]
    return f"; {last['n_flips']} random flips: {times(ratio)} (mean of {len(last['seeds'])} seeds)"


def search_lines(section: dict) -> list[str]:
    lines = [search_headline(section) + _random_text(section)]
    msb = section["top_metric_msb"]
    if msb:
        lines.append(f"  most damaging bit of the top-{msb['n_flips']} {msb['metric']} weights: "
                     f"{times(msb['ppl_ratio'])}")
    if not section["restore_verified"]:
        lines.append("  WARNING: weights not restored bit-exactly")
    return lines


def search_findings(section: dict) -> list[str]:
    out = [search_headline(section).capitalize() + _random_text(section) + "."]
    if section["quantization"]:
        out.append(f"Baseline perplexity {sig(section['baseline']['perplexity'])} quantized "
                   f"against {sig(section['float_baseline']['perplexity'])} in floating point.")
    msb = section["top_metric_msb"]
    if msb:
        out.append(f"Flipping the most damaging bit of the top-{msb['n_flips']} "
                   f"{msb['metric']} weights instead: {times(msb['ppl_ratio'])}.")
    return out


def search_table(section: dict) -> list[dict]:
    return [{"flip": r["step"], "parameter": r["parameter"], "row": r["row"], "col": r["col"],
             "bit": r["bit"], "before": sig(r["value_before"]), "after": sig(r["value_after"]),
             "batch ppl": times(r["batch_ppl_ratio"]),
             "eval ppl": "" if r["eval_ppl_ratio"] is None else times(r["eval_ppl_ratio"])}
            for r in section["steps"]]


def plot_search(section: dict):
    from src.plots.style import PALETTE, plt

    steps = section["steps"]
    figure, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([0] + [r["step"] for r in steps], [1.0] + [_finite(r["batch_ppl_ratio"]) for r in steps],
            marker="o", color=PALETTE[0], label="search, calibration batch")
    measured = [r for r in steps if r["eval_ppl_ratio"] is not None]
    ax.plot([0] + [r["step"] for r in measured], [1.0] + [_finite(r["eval_ppl_ratio"]) for r in measured],
            marker="s", color=PALETTE[1], label="search, evaluation")
    for row in section["random_flips"]:
        ratios = [_finite(v) for v in row["ppl_ratio"]]
        ax.scatter([row["n_flips"]] * len(ratios), ratios, color="0.5", marker="x", zorder=3,
                   label="random flips (per seed)" if row is section["random_flips"][0] else None)
    msb = section["top_metric_msb"]
    if msb:
        ax.scatter([msb["n_flips"]], [_finite(msb["ppl_ratio"])], color=PALETTE[2], marker="*",
                   s=90, zorder=3, label=f"MSB of the top-{msb['n_flips']} {msb['metric']} weights")
    ax.axhline(section["target_ratio"], color="0.6", linestyle=":", linewidth=0.8,
               label=f"target x{sig(section['target_ratio'])}")
    ax.set_yscale("log")
    ax.set_xlabel("bit flips")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("perplexity / baseline")
    ax.set_title(f"Progressive bit search, {format_label(section)}")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _finite(value) -> float:
    return value if value is not None and math.isfinite(value) else np.nan
