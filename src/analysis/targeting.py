"""enhanced_analysis.json ``targeting``: which weights the --target-* restriction left eligible.

--target-components and --target-layers restrict the eligible weights of the whole run (scoring,
ranking, controls, every analysis; see src/sensitivity/eligibility.py); this section records
what that left.
"""
from __future__ import annotations

from src.analysis.context import AnalysisContext
from src.analysis.registry import Analysis, register


def describe_targeting(settings, metas) -> dict:
    components: dict[str, int] = {}
    for meta in metas.values():
        components[meta.component] = components.get(meta.component, 0) + 1
    return {"target_components": list(settings.target_components),
            "target_layers": settings.target_layers, "layers": settings.layers,
            "eligible_tensors": len(metas), "tensors_per_component": components,
            "eligible_layers": sorted({m.layer for m in metas.values() if m.layer is not None}),
            "note": "the whole run (scoring, ranking, controls, every analysis) used this set"}


def run(ctx: AnalysisContext) -> dict:
    return describe_targeting(ctx.settings, ctx.metas)


def summary_lines(section: dict) -> list[str]:
    return [f"targeting: {section['eligible_tensors']} eligible tensors "
            f"{section['tensors_per_component']}"]


register(Analysis(
    key="targeting", flag="--target-components or --target-layers",
    run=run, summary=summary_lines,
    reads=("target_components", "target_layers", "layers"),
    enabled=lambda s: bool(s.target_components or s.target_layers)))
