"""The real CLI end to end: outputs per the contract, reproducibility, and every error case."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import RUNNER, ROOT, run_cli

SMALL = ["--max-length", "32", "--max-samples", "3", "--batch-size", "3"]


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """The same full protocol twice (same seeds) on the built-in model."""
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"run{i}")
        env = dict(os.environ, MY_SERVICE_TOKEN="supersecret-value", CWA_PLAIN="visible")
        proc = subprocess.run(
            [sys.executable, str(RUNNER), *SMALL, "--topk", "5", "--mode", "global",
             "--perturb", "zero", "--seeds", "0,1", "--stability-check",
             "--stability-batches", "3", "--save-scores", "--out-dir", str(out)],
            cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append((out, proc))
    return outs


def read(path):
    return json.loads(path.read_text())


def test_full_run_writes_the_output_contract(full_runs):
    out, proc = full_runs[0]
    for name in ("config.json", "experiment_manifest.json", "sensitivity_stats.json",
                 "top_weights.csv", "perturbation_results.json", "stability_results.json",
                 "scores.safetensors"):
        assert (out / name).is_file(), name
    assert "baseline perplexity" in proc.stdout and "top 5 weights" in proc.stdout
    table = pd.read_csv(out / "top_weights.csv")
    assert list(table.columns[:9]) == ["rank", "parameter", "layer", "component", "row", "col",
                                       "flat_index", "score", "value"]
    assert table["rank"].tolist() == [1, 2, 3, 4, 5]
    results = read(out / "perturbation_results.json")
    assert set(results["baseline"]) == {"perplexity", "nll", "token_accuracy", "n_tokens"}
    assert results["restore_verified"] is True
    selections = [c["selection"] for c in results["conditions"]]
    assert selections == ["top_k", "random_k", "random_k", "bottom_k"]
    for condition in results["conditions"]:
        for key in ("selection", "seed", "method", "n_weights", "perplexity", "nll",
                    "token_accuracy", "delta_perplexity", "ppl_ratio"):
            assert key in condition
        assert condition["n_weights"] == 5
    stats = read(out / "sensitivity_stats.json")
    some = next(iter(stats["parameters"].values()))
    assert {"layer", "component", "numel", "mean", "std", "min", "max", "p50", "p95",
            "p99"} <= set(some)
    assert stats["tied_parameters"] == {"lm_head.weight": "model.embed_tokens.weight"}
    stability = read(out / "stability_results.json")
    assert len(stability["across_batches"]["jaccard"]["pairs"]) == 3
    assert stability["k"] == 5


def test_manifest_content_and_secret_redaction(full_runs):
    out, _ = full_runs[0]
    manifest = read(out / "experiment_manifest.json")
    assert manifest["success"] is True
    assert manifest["environment"]["variables"]["MY_SERVICE_TOKEN"] == "<redacted>"
    assert manifest["environment"]["variables"]["CWA_PLAIN"] == "visible"
    assert "supersecret-value" not in (out / "experiment_manifest.json").read_text()
    assert manifest["versions"]["torch"] and manifest["versions"]["transformers"]
    assert manifest["git"]["available"] in (True, False)
    assert len(manifest["data"]["evaluation"]["sha256"]) == 64
    assert manifest["seeds"] == [0, 1]
    for step in ("load_model", "baseline_eval", "score_grad_x_weight", "perturbation", "stability"):
        assert step in manifest["timings_seconds"]
    listed = {f["path"] for f in manifest["output_files"]}
    assert listed == {p.name for p in out.iterdir() if p.is_file()}


def test_same_seeds_give_identical_numbers(full_runs):
    (first, _), (second, _) = full_runs
    for name in ("perturbation_results.json", "stability_results.json", "sensitivity_stats.json"):
        assert read(first / name) == read(second / name), name
    assert (first / "top_weights.csv").read_text() == (second / "top_weights.csv").read_text()


def test_manifest_outside_a_git_checkout(tmp_path):
    from src.utils.manifest import git_state
    state = git_state(tmp_path)
    assert state["available"] is False and "not inside a git checkout" in state["reason"]


def expect_user_error(args, out_dir, match, env=None):
    proc = subprocess.run([sys.executable, str(RUNNER), *map(str, args), "--out-dir", str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert match in lines[0], lines[0]


def test_error_cases_exit_2_with_one_line_and_keep_existing_outputs(tmp_path):
    out = tmp_path / "existing_run"
    out.mkdir()
    (out / "config.json").write_text('{"keep": true}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words.\n\nand a few more.\n")
    tiny = ["--model", "random:tiny-llama", "--device", "cpu"]
    cases = [
        (["--model", "./no/such/model"], "does not exist"),
        (["--model", "nobody-has-this/model-xyz"], "could not be loaded from the Hugging Face hub"),
        ([*tiny, "--data-file", str(empty)], "empty"),
        ([*tiny, "--data-file", str(tmp_path / "missing.txt")], "does not exist"),
        ([*tiny, "--data-file", str(short), "--max-length", "128"], "data too short"),
        ([*tiny, "--max-length", "4096"], "exceeds the model's context"),
        ([*tiny, "--device", "tpu"], "bad --device"),
        ([*tiny, "--metric", "nonsense"], "unknown --metric"),
        ([*tiny, "--topk", "0"], "--topk must be at least 1"),
        ([*tiny, "--topk", "100000000"], "larger than"),
        ([*tiny, "--perturb", "melt"], "unknown --perturb"),
        ([*tiny, "--bit-position", "99"], "outside"),
        ([*tiny, "--controls", "everything"], "bad --controls"),
    ]
    for args, match in cases:
        expect_user_error(args, out, match, env={"HF_HUB_OFFLINE": "1"})
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, args
    as_file = tmp_path / "a_file"
    as_file.write_text("x")
    expect_user_error(tiny, as_file, "is a file")
    assert as_file.read_text() == "x"


def test_data_file_run_prints_finite_baseline(tmp_path):
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(f"Line {i}: the river rose slowly while the town slept and the "
                              f"bells of the old church rang {i} times." for i in range(60)))
    proc = run_cli(*SMALL, "--data-file", data, "--metric", "magnitude", "--topk", "3",
                   "--out-dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if "baseline perplexity" in l)
    value = float(line.split("baseline perplexity")[1].split()[0])
    assert 1.0 < value < 1000.0
