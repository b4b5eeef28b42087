"""The research report over many run folders: a runs table, cross-run plots, findings and one
section per run, as Markdown and/or self-contained HTML (scripts/generate_research_report.py).

Every folder below the inputs that holds ``config.json`` or ``experiment_manifest.json`` is a run
(src/report/run_folder.py). Runs are labelled by their path below the input folder; where two
inputs hold runs of the same name, the input's name (then its position) is prefixed, so no run or
figure overwrites another. A folder with unreadable files, or whose run did not succeed, is
listed at the end and never counted among the results; the exit status is 0 when at least one
run was read, 2 otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.errors import UserError
from src.report.cross_faults import faults_table
from src.report.cross_run import (CROSS_RUN_PLOTS, cross_run_findings, draw_cross_run_plots,
                                  faithfulness_table)
from src.report.document import Doc, to_html, to_markdown
from src.report.findings import analysis_tables, jaccard_of, mean_sd_text, run_findings
from src.report.run_folder import RunFolder, read_runs
from src.utils.format import ppl, sig
from src.utils.io import write_text
from src.utils.output import location_problem
from src.utils.report_console import score_facts_text
from src.utils.secrets import redacted_console

REPORT_FORMATS = ("md", "html")


def run_row(run: RunFolder) -> dict:
    row = {"run": run.label, "model": run.get("model"), "metric": run.get("metric"),
           "mode": run.get("mode"), "K": run.get("topk"), "perturb": run.get("perturb") or "—",
           "baseline ppl": "—", "top-K ppl": "—", "random-K ppl (mean ± sd)": "—",
           "bottom-K ppl": "—", "effect ratio": "—", "p-value": "—",
           "Jaccard seeds": sig(jaccard_of(run, "across_seeds"), 3),
           "Jaccard batches": sig(jaccard_of(run, "across_batches"), 3)}
    if run.perturbation:
        summary = run.summary
        comparison = summary.get("top_vs_random") or {}
        row.update({"baseline ppl": ppl(run.perturbation["baseline"]["perplexity"]),
                    "top-K ppl": mean_sd_text(summary.get("top_k")),
                    "random-K ppl (mean ± sd)": mean_sd_text(summary.get("random_k")),
                    "bottom-K ppl": mean_sd_text(summary.get("bottom_k")),
                    "effect ratio": sig(comparison.get("effect_ratio"), 3),
                    "p-value": sig(comparison.get("empirical_p_value"), 3)})
    return row



def build_report(runs: list[RunFolder], skipped: list[tuple[str, str]], figures: dict[str, Path],
                 inputs: list[Path]) -> Doc:
    doc = Doc()
    doc.heading(1, "Critical Weight Analysis: research report")
    models = sorted({str(r.get("model")) for r in runs})
    metrics = sorted({str(r.get("metric")) for r in runs})
    doc.paragraph(f"{len(runs)} run(s) from {', '.join(f'`{p}`' for p in inputs)}: "
                  f"model(s) {', '.join(models)}; metric(s) {', '.join(metrics)}."
                  + (f" {len(skipped)} folder(s) left out (see the end)." if skipped else ""))
    doc.heading(2, "Runs")
    doc.table([run_row(run) for run in runs])
    doc.paragraph("Perplexities are token-mean over the evaluation blocks (disjoint from the "
                  "calibration text). Random-K: mean ± sample sd over seeds. Effect ratio: "
                  "|top-K Δppl| / mean |random-K Δppl|. p-value: empirical, (1 + #random draws "
                  "at least as damaging as top-K) / (1 + n). Jaccard: mean over pairs of top-K "
                  "sets (seeds: random calibration subsets; batches: disjoint calibration parts).")
    doc.heading(2, "Findings")
    across = cross_run_findings(runs)
    if across:
        doc.heading(3, "Across runs")
        doc.bullets(across)
    faithful = faithfulness_table(runs)
    if faithful:
        doc.heading(3, "Which metric finds the weights that matter (--faithfulness)")
        doc.paragraph("Per run: the metric whose top-K does the most damage over the K grid "
                      "(area under log(ppl / baseline) over log10 K, nats·decade), against the "
                      "runner-up and the random-K band; ' = ' joins metrics tied within the "
                      "band's own spread.")
        doc.table(faithful)
    faults = faults_table(runs)
    if faults:
        doc.heading(3, "Hardware faults (--fault-injection, --bit-search)")
        doc.paragraph("Critical upsets: single-bit upsets whose perplexity exceeds the run's "
                      "--critical-ratio times baseline (Wilson 95% interval). Flips to 10x / "
                      "100x: the search's flips until evaluation perplexity reached that "
                      "multiple; random flips: uniform flips of the search's final count, mean "
                      "perplexity over seeds / baseline.")
        doc.table(faults)
    doc.heading(3, "Per run (headline; details in each run's section)")
    doc.bullets([f"`{run.label}`: {run_findings(run)[0]}" for run in runs if run_findings(run)]
                or ["No run has perturbation, stability or top-K results."])
    if figures:
        doc.heading(2, "Cross-run plots")
        for name, path in figures.items():
            doc.image(path, CROSS_RUN_PLOTS[name][0])
    doc.heading(2, "Runs in detail")
    for run in runs:
        run_section(doc, run)
    if skipped:
        doc.heading(2, "Folders left out")
        doc.bullets([f"`{label}`: {reason}" for label, reason in skipped])
    return doc


def run_section(doc: Doc, run: RunFolder) -> None:
    doc.heading(3, run.label)
    manifest = run.manifest or {}
    data = manifest.get("data") or {}
    evaluation = data.get("evaluation") or {}
    seconds = sum((manifest.get("timings_seconds") or {}).values())
    device = (manifest.get("model") or {}).get("device")
    doc.paragraph(f"Folder `{run.path}`; model {run.get('model')} on {device}, metric "
                  f"{run.get('metric')}, K={run.get('topk')} ({run.get('mode')}), perturbation "
                  f"{run.get('perturb') or 'none'}, seeds {run.get('seeds')}; data "
                  f"{data.get('source', '?')} with {evaluation.get('blocks', '?')} evaluation "
                  f"blocks of {run.get('max_length')} tokens; {seconds:.0f} s in all.")
    if manifest.get("scores_source"):
        doc.paragraph(scores_source_text(manifest["scores_source"]))
    facts = dict(manifest.get("score_facts") or {})
    if facts:
        doc.paragraph(score_facts_text(facts.pop("metric", run.get("metric")), facts) + ".")
    if run.enhanced:
        doc.paragraph("Optional analyses in enhanced_analysis.json: "
                      + ", ".join(f"`{key}`" for key in run.enhanced) + ".")
    doc.bullets(run_findings(run))
    for caption, rows in analysis_tables(run):
        doc.paragraph(caption + ":")
        doc.table(rows)
    pngs = [p for p in run.plots if p.suffix == ".png"]
    for path in pngs:
        doc.image(path, f"{run.label}: {path.stem.replace('_', ' ')}")
    for path in run.plots:
        if path.suffix != ".png":
            doc.link(path, f"{path.name}")
    if not run.plots:
        doc.paragraph("No plots in this run (it ran without --save-plots).")


def scores_source_text(source: dict) -> str:
    """Where a run's scores came from (--scores-from, or its own on --resume) and the
    calibration data they were computed on."""
    text = f"Scores loaded from `{source.get('path')}` ({source.get('metric')} scores"
    text += f", file sha256 {source['sha256'][:12]})" if source.get("sha256") else ")"
    calibration = source.get("calibration")
    if calibration:
        settings = [f"{name.replace('_', ' ')} {calibration[name]}"
                    for name in ("max_length", "max_samples", "blocks") if name in calibration]
        settings.append(f"blocks sha256 {calibration['sha256'][:12]}")
        text += (f", computed on calibration data {calibration.get('source', '(not recorded)')}"
                 f" ({', '.join(settings)})")
    if source.get("same_calibration_as_this_run") is False:
        text += f": other calibration data than this run's ({'; '.join(source['differences'])})"
    elif source.get("same_calibration_as_this_run"):
        text += ": the same calibration blocks as this run"
    return text + "."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Collect every run below the input folders into one research report "
                    "(Markdown and/or self-contained HTML) with a runs table, cross-run plots "
                    "and findings computed from the numbers.")
    parser.add_argument("--input-dirs", nargs="+", required=True, type=Path,
                        help="folders searched (recursively) for run folders")
    parser.add_argument("--output", required=True, type=Path,
                        help="report path prefix: writes PREFIX.md / PREFIX.html and "
                             "PREFIX_figures/")
    parser.add_argument("--format", default="md,html",
                        help="comma-separated: md, html")
    return parser.parse_args(argv)


def report_formats(text: str) -> list[str]:
    formats = list(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    if not formats or any(f not in REPORT_FORMATS for f in formats):
        raise UserError(f"bad --format '{text}': use md, html or md,html")
    return formats


def output_problem(prefix: Path, formats: list[str]) -> str | None:
    """Why the report cannot be written at ``prefix`` (None when it can): its folder cannot be
    made or written, or a report file or the figures folder is in the way as the wrong kind."""
    problem = location_problem(str(prefix.parent))
    if problem:
        return f"the report's folder {problem}"
    figures = prefix.parent / f"{prefix.name}_figures"
    if figures.exists() and not figures.is_dir():
        return f"'{figures}' (the figures' folder) exists and is a file"
    for path in (prefix.parent / f"{prefix.name}.{fmt_name}" for fmt_name in formats):
        if path.is_dir():
            return f"'{path}' exists and is a folder"
    return None


def generate(args: argparse.Namespace) -> list[Path]:
    formats = report_formats(args.format)
    for root in args.input_dirs:
        if not root.is_dir():
            raise UserError(f"--input-dirs '{root}' is not a folder")
    problem = output_problem(args.output, formats)
    if problem:
        raise UserError(f"--output '{args.output}': {problem}")
    runs, skipped = read_runs(args.input_dirs)
    for label, reason in skipped:
        print(f"[report] {label}: {reason}", file=sys.stderr)
    if not runs:
        found = "no run folders (with config.json or experiment_manifest.json)" if not skipped \
            else f"no readable finished runs ({len(skipped)} folder(s) skipped)"
        raise UserError(f"{found} below {', '.join(map(str, args.input_dirs))}")
    prefix = args.output
    prefix.parent.mkdir(parents=True, exist_ok=True)
    figures = draw_cross_run_plots(runs, prefix.parent / f"{prefix.name}_figures")
    doc = build_report(runs, skipped, figures, args.input_dirs)
    written = []
    for fmt_name in formats:
        path = prefix.parent / f"{prefix.name}.{fmt_name}"
        text = to_markdown(doc, path.parent) if fmt_name == "md" else \
            to_html(doc, path.parent, "Critical Weight Analysis report")
        written.append(write_text(path, text))
    print(f"[report] {len(runs)} run(s), {len(skipped)} skipped -> "
          + ", ".join(str(p) for p in written))
    return written


def main(argv=None) -> int:
    with redacted_console():
        try:
            generate(parse_args(argv))
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0

