"""The analysis registry: one entry per section of enhanced_analysis.json.

An analysis is one module in ``MODULES`` that calls ``register(Analysis(...))`` at import. The
entry carries everything the rest of the tool needs from it:

* ``settings``: frozen dataclasses whose fields are its flags (``src.options.option``); the CLI,
  ``RunConfig`` and config.json pick them up from here. Analyses may share one (e.g. the
  clustering settings). ``reads`` names further settings it uses (e.g. ``max_length``, ``bit_position``); the
  analysis receives exactly these fields as ``ctx.settings``.
* ``enabled(settings)``: whether this run performs it.
* ``prepare(settings, preflight)``: checks and inputs that need the loaded model and data; runs
  before the output folder is touched, so bad input never costs an existing run's files.
* ``run(ctx) -> dict``: the section; ``summary(section)``: console lines; ``findings(section)``:
  report sentences; ``plots``: name -> function(section) -> matplotlib Figure; ``flag``: what
  turns it on, for the note a plot leaves when the section is absent.
* ``files(section, out_dir) -> [names]``: files of its own beside enhanced_analysis.json (e.g.
  a tidy CSV), written right after the section; ``tables``: caption -> function(section) ->
  rows (dicts) that the research report shows for the run.

Adding an analysis: write its module and add its name to ``MODULES``. Every analysis also runs
under ``torchrun --shard``, where ``ctx.layout`` (sharding.Layout) says that the scores and
weights are each rank's rows: rank, read values and add up sums through it (see the others).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Mapping

MODULES = ("targeting", "weight_analysis", "correlation", "architecture", "temporal",
           "advanced_perturbations", "super_weights", "faithfulness", "faults", "mediation")


def _no_lines(section: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class Analysis:
    key: str
    run: Callable[[Any], dict]
    enabled: Callable[[SimpleNamespace], bool]
    settings: tuple[type, ...] = ()
    reads: tuple[str, ...] = ()
    prepare: Callable[[SimpleNamespace, Any], Any] | None = None
    summary: Callable[[dict], list[str]] = _no_lines
    findings: Callable[[dict], list[str]] | None = None
    plots: Mapping[str, Callable] = field(default_factory=dict)
    flag: str = ""
    files: Callable[[dict, Any], list[str]] | None = None
    tables: Mapping[str, Callable[[dict], list[dict]]] = field(default_factory=dict)


ANALYSES: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    if analysis.key in ANALYSES and ANALYSES[analysis.key] is not analysis:
        raise ValueError(f"analysis '{analysis.key}' is registered twice")
    ANALYSES[analysis.key] = analysis
    return analysis


def load() -> dict[str, Analysis]:
    """Every analysis, in the order of ``MODULES`` (the order of enhanced_analysis.json), then
    in the order each module registers them, whichever module was imported first."""
    for name in MODULES:
        importlib.import_module(f"src.analysis.{name}")
    ordered = sorted(ANALYSES.values(), key=lambda a: MODULES.index(_module_of(a)))
    return {analysis.key: analysis for analysis in ordered}


def _module_of(analysis: Analysis) -> str:
    return analysis.run.__module__.split(".")[2]


def settings_classes() -> list[type]:
    """The settings dataclass of every analysis, each once, in registry order."""
    return list(dict.fromkeys(cls for a in load().values() for cls in a.settings))


def settings_for(analysis: Analysis, config) -> SimpleNamespace:
    """The analysis' own flags and the run settings it reads, from a RunConfig."""
    values = {}
    for settings_class in analysis.settings:
        values.update(vars(config.settings(settings_class)))
    values.update({name: config.value(name) for name in analysis.reads})
    return SimpleNamespace(**values)


def enabled(config) -> list[tuple[Analysis, SimpleNamespace]]:
    """(analysis, its settings) of every analysis this run performs, in registry order."""
    chosen = []
    for analysis in load().values():
        settings = settings_for(analysis, config)
        if analysis.enabled(settings):
            chosen.append((analysis, settings))
    return chosen


def plots() -> dict[str, Callable]:
    """name -> function(RunFolder) -> Figure for every analysis plot: each draws its section of
    the run's enhanced_analysis.json (InputAbsent when the analysis did not run)."""
    return {name: _on_section(analysis, draw) for analysis in load().values()
            for name, draw in analysis.plots.items()}


def _on_section(analysis: Analysis, draw: Callable) -> Callable:
    def draw_run(run):
        return draw(run.analysis(analysis.key, f"needs {analysis.flag}"))
    return draw_run
