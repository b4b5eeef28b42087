"""How a run shows progress on its long steps (scoring passes, evaluations, conditions).

* ``bars``: tqdm bars of the tool's own loops, when stderr is a terminal (or with --verbose,
  which also keeps the libraries' own bars and logging);
* ``lines``: when stderr is a log file, CI or a Slurm job: one line per finished scoring pass and
  per finished condition, flushed at once, so a log never sits silent for minutes;
* ``off``: --quiet, and every torchrun process but rank 0 (which speaks for all).
"""
from __future__ import annotations

import os
import sys

MODES = ("bars", "lines", "off")


def mode(quiet: bool, verbose: bool) -> str:
    if quiet or int(os.environ.get("RANK", "0")) != 0:
        return "off"
    return "bars" if verbose or sys.stderr.isatty() else "lines"


def line(text: str) -> None:
    """One progress line on stderr (the results stay on stdout)."""
    print(f"[cwa] {text}", file=sys.stderr, flush=True)
