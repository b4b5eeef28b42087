"""Shared fixtures. The built-in model is loaded once per pytest session (from the cache after
the first run ever); tiny random presets are cheap and built per test module.

The suite runs in two pytest-xdist workers (pyproject.toml): each worker and every process it
starts uses one thread, so the two never compete for the machine's cores."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # CLI runs and torchrun ranks started by the tests
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "phase1_runner_enhanced.py"


def load(spec: str | None, **kwargs):
    from src.models.loader import load_model

    model, tokenizer, info = load_model(spec, device="cpu", dtype="float32", **kwargs)
    return SimpleNamespace(model=model, tokenizer=tokenizer, info=info)


@pytest.fixture(scope="session")
def builtin():
    """The built-in SmolLM2-135M (shared: tests must leave its weights as they found them)."""
    return load(None)


@pytest.fixture(scope="session")
def builtin_data(builtin):
    from src.data.loading import prepare_data

    return prepare_data(builtin.tokenizer, max_length=64, max_samples=4)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return load("random:tiny-llama")


@pytest.fixture
def scoring_passes(monkeypatch) -> dict[str, int]:
    """metric -> how many scoring passes of it run during the test (every metric that scores
    itself, i.e. has no base, counted through its registry entry)."""
    from dataclasses import replace

    from src.sensitivity.metrics import METRICS

    counts = {name: 0 for name, metric in METRICS.items() if metric.base is None}

    def counted(name, fn):
        def run(job):
            counts[name] += 1
            return fn(job)
        return run

    for name in counts:
        monkeypatch.setitem(METRICS, name, replace(METRICS[name],
                                                   fn=counted(name, METRICS[name].fn)))
    return counts


def run_cli(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess; returns the completed process (text output)."""
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
