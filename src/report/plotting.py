"""A run's plots: the registry of the core plots (``run_plot``; src/report/run_plots.py and
experiment_plots.py) and ``save_run_plots``, which draws them with the analyses' plots.

A plot is a function(RunFolder) -> Figure. A plot whose input is absent (no --perturb, an
analysis that did not run) raises ``InputAbsent``; one that cannot be drawn from this run raises
``SkipPlot``; ``save_run_plots`` reports either and moves on.
"""
from __future__ import annotations

from typing import Callable

from src.plots.style import SkipPlot, plt, save_figure
from src.report.run_folder import InputAbsent, RunFolder

RUN_PLOTS: dict[str, Callable] = {}  # the core plots: src/report/run_plots, experiment_plots


def run_plot(name: str):
    """Registers a core plot: function(RunFolder) -> Figure."""
    def add(function):
        RUN_PLOTS[name] = function
        return function
    return add


def save_run_plots(run: RunFolder, plots: dict[str, Callable], formats=("png",)) -> list[str]:
    """Draw every plot whose input exists into <run folder>/plots/; returns the written paths."""
    written, absent = [], []
    for name, draw in plots.items():
        open_before = set(plt.get_fignums())
        try:
            figure = draw(run)
        except InputAbsent as reason:
            absent.append(f"{name} ({reason})")
            continue
        except SkipPlot as reason:
            print(f"[cwa] plot {name} skipped: {reason}")
            continue
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            # a layout this plot does not know (e.g. a newer analysis): the run's results stand
            print(f"[cwa] plot {name} FAILED, results unaffected: {type(error).__name__}: "
                  f"{error}")
            for number in set(plt.get_fignums()) - open_before:
                plt.close(number)
            continue
        written += save_figure(figure, run.path / "plots" / name, formats)
    if absent:
        print(f"[cwa] plots skipped, their input is absent: {'; '.join(absent)}")
    print(f"[cwa] {len(written)} plot files in {run.path / 'plots'}")
    return written
