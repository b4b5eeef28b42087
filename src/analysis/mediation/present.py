"""What --mediation shows: mediation.json, console lines, report sentences, a table and a plot."""
from __future__ import annotations

import numpy as np

from src.utils.format import sig
from src.utils.io import write_json


def write(section: dict, out_dir) -> list[str]:
    write_json(out_dir / "mediation.json", section)
    return ["mediation.json"]


def share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def restore_table(section: dict) -> list[dict]:
    return [{"source": r["source"], "positions": r["positions"], "patched": r["n_positions"],
             "ΔNLL": sig(r["delta_nll"]), "recovered": share(r["recovered_share"])}
            for r in section.get("restore", [])]


def _restored(section: dict, label: str) -> dict[str, dict]:
    return {r["positions"]: r for r in section.get("restore", []) if r["source"] == label}


def summary_lines(section: dict) -> list[str]:
    if "skipped" in section:
        return [f"mediation: skipped ({section['skipped']})"]
    clean = section["clean"]["nll"]
    lines = [f"mediation ({section['method']['sources_from']}; clean NLL {sig(clean)} on "
             f"{section['method']['eval_blocks']} blocks):",
             f"  {'source':<34} {'ΔNLL zeroed':>12} {'all':>8} {'spike':>8} {'first':>8}"]
    for label, damaged in section["damaged"].items():
        rows = _restored(section, label)
        lines.append(f"  {label:<34} {sig(damaged['nll'] - clean):>12} "
                     + " ".join(f"{share(rows[p]['recovered_share']):>8}"
                                for p in ("all", "spike", "first")))
    for r in section.get("remove", []):
        lines.append(f"  remove {r['source']} ({r['operation']}): ΔNLL {sig(r['delta_nll'])}, "
                     f"random channels at most {sig(r['max_control_delta_nll'])}")
    if section.get("atp"):
        lines.append("  " + atp_sentence(section))
    for p in section.get("pairs", []):
        lines.append(f"  pair {p['a']} + {p['b']}: interaction {sig(p['interaction'])} "
                     f"[{sig(p['interaction_interval'][0])}, {sig(p['interaction_interval'][1])}]")
    lines.append(f"  weights restored bit-exactly: {section['restore_verified']}; hooks removed: "
                 f"{section['hooks_removed']}")
    return lines


def atp_sentence(section: dict) -> str:
    a = section["atp"]
    top = a["top_site"]
    return (f"attribution patching vs exact on {a['n_compared']} sites: Spearman "
            f"{sig(a['spearman'], 3)}, exact top-20 found by the estimate's top-20 "
            f"{share(a['top20_overlap'])}; estimate's top site block {top['layer']} channel "
            f"{top['channel']}")


def flow_sentence(section: dict) -> str:
    residual = [r for r in section["flow"] if r["site"] == "residual"]
    parts = []
    if residual:
        last = residual[-1]
        parts.append(f"the clean residual channel recovers {share(residual[0]['recovered_share'])}"
                     f" at block {residual[0]['layer']} and {share(last['recovered_share'])} at "
                     f"block {last['layer']}")
    for kind in ("attention", "mlp"):
        rows = [r for r in section["flow"] if r["site"] == kind and r["recovered_share"] is not None]
        if rows:
            best = max(rows, key=lambda r: r["recovered_share"])
            parts.append(f"the largest single {kind} output recovers {share(best['recovered_share'])}"
                         f" (block {best['layer']})")
    return "; ".join(parts)


def findings(section: dict) -> list[str]:
    if "skipped" in section:
        return [f"Mediation: skipped ({section['skipped']})."]
    clean = section["clean"]["nll"]
    lines = []
    for label, damaged in section["damaged"].items():
        rows = _restored(section, label)
        spike, first = rows["spike"], rows["first"]
        lines.append(f"Mediation of {label}: zeroing raises NLL by {sig(damaged['nll'] - clean)} "
                     f"nats/token; restoring its output channel at all positions recovers "
                     f"{share(rows['all']['recovered_share'])}, at the {spike['n_positions']} "
                     f"spike positions only {share(spike['recovered_share'])}, at the first "
                     f"token only {share(first['recovered_share'])}.")
    for r in section.get("remove", []):
        lines.append(f"Removing the channel of {r['source']} ({r['operation']}) on the clean "
                     f"model raises NLL by {sig(r['delta_nll'])}; the same on random channels of "
                     f"its module by at most {sig(r['max_control_delta_nll'])}.")
    if section.get("flow"):
        lines.append(f"Flow of {section['main_source']}: {flow_sentence(section)}.")
    if section.get("atp"):
        lines.append(atp_sentence(section)[0].upper() + atp_sentence(section)[1:] + ".")
    for p in section.get("pairs", []):
        low, high = p["interaction_interval"]
        lines.append(f"{p['a']} and {p['b']}: ΔNLL {sig(p['delta_nll_a'])} and "
                     f"{sig(p['delta_nll_b'])} alone, {sig(p['delta_nll_joint'])} together; "
                     f"interaction {sig(p['interaction'])} (95% bootstrap [{sig(low)}, "
                     f"{sig(high)}]).")
    return lines


def plot(section: dict):
    from src.plots.style import PALETTE, plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8),
                                         gridspec_kw={"width_ratios": [1.4, 1]})
    _plot_flow(left, section, PALETTE)
    _plot_atp(right, section, PALETTE)
    figure.suptitle(f"Mediation of {section.get('main_source') or 'no source'} (clean NLL "
                    f"{sig(section['clean']['nll']) if 'clean' in section else 'n/a'})",
                    fontsize=11)
    figure.tight_layout()
    return figure


def _plot_flow(ax, section: dict, palette) -> None:
    from matplotlib.ticker import MaxNLocator

    rows = section.get("flow") or []
    if not rows:
        _empty(ax, "no flow: no source with a finite damage inside the decoder blocks")
        return
    for colour, site in zip(palette, ("residual", "attention", "mlp")):
        points = [(r["layer"], r["recovered_share"]) for r in rows
                  if r["site"] == site and r["recovered_share"] is not None]
        if points:
            x, y = zip(*points)
            ax.plot(x, np.array(y) * 100, "-o", color=colour, markersize=4,
                    label={"residual": "residual channel of the source (block output)",
                           "attention": "whole attention output", "mlp": "whole MLP output"}[site])
    ax.axhline(100, color="black", linestyle=":", linewidth=1)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block patched (clean into damaged run)")
    ax.set_ylabel("damage recovered (%)")
    ax.set_title("Where the damage flows", fontsize=10)
    ax.legend(fontsize=7)


def _plot_atp(ax, section: dict, palette) -> None:
    atp = section.get("atp")
    if not atp:
        _empty(ax, "no attribution patching")
        return
    for colour, chosen in zip(palette, ("top", "random")):
        points = [(r["estimate"], r["exact"]) for r in atp["evaluated"]
                  if r["chosen"] == chosen and r["exact"] is not None]
        if points:
            x, y = zip(*points)
            ax.scatter(np.array(x) * 100, np.array(y) * 100, s=14, color=colour,
                       label="the estimate's top sites" if chosen == "top" else "random sites")
    values = [v * 100 for r in atp["evaluated"] for v in (r["estimate"], r["exact"])
              if v is not None]
    if values:
        ax.plot([min(values), max(values)], [min(values), max(values)], ":", color="black",
                linewidth=1, label="estimate = exact")
    ax.set_xlabel("attribution-patching estimate (% recovered)")
    ax.set_ylabel("exact patching (% recovered)")
    ax.set_title(f"AtP vs exact: Spearman {sig(atp['spearman'], 3)}, top-20 overlap "
                 f"{share(atp['top20_overlap'])}", fontsize=10)
    ax.legend(fontsize=7)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_axis_off()
