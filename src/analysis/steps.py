"""Which advanced analyses a run performs, in order: key in enhanced_analysis.json -> function.

Each function takes the AnalysisContext and returns the JSON section; ``print_lines`` prints the
section's short console summary.
"""
from __future__ import annotations

from functools import partial

from src.analysis import (advanced_perturbations, architecture, correlation, temporal,
                          weight_analysis)
from src.analysis.context import AnalysisContext


def targeting(ctx: AnalysisContext) -> dict:
    return advanced_perturbations.describe_targeting(ctx.config, ctx.metas)


def analysis_steps(config) -> list[tuple[str, callable]]:
    steps = []
    if config.target_components or config.target_layers:
        steps.append(("targeting", targeting))
    if config.weight_analysis:
        steps.append(("weight_analysis", weight_analysis.run))
    if config.compare_metrics:
        steps.append(("metric_correlation", correlation.run))
    if config.architecture_analysis:
        steps.append(("architecture", architecture.run))
    if config.temporal_stability:
        steps.append(("temporal_stability", temporal.run))
    for name in config.advanced_perturbations:
        steps.append((f"{name}_perturbation", partial(advanced_perturbations.run, name=name)))
    return steps


SUMMARIES = {
    "weight_analysis": weight_analysis.summary_lines,
    "metric_correlation": correlation.summary_lines,
    "architecture": architecture.summary_lines,
    "temporal_stability": temporal.summary_lines,
    **{f"{name}_perturbation": partial(advanced_perturbations.summary_lines, name)
       for name in advanced_perturbations.ADVANCED},
}


def print_lines(key: str, section: dict) -> None:
    if key == "targeting":
        print(f"[cwa] targeting: {section['eligible_tensors']} eligible tensors "
              f"{section['tensors_per_component']}")
        return
    for line in SUMMARIES[key](section):
        print(f"[cwa] {line}")
