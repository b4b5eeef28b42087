"""The real CLI end to end: outputs per the contract, reproducibility, and every error case."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from src.cli import main
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


@pytest.mark.slow
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
    # the names the file has always had (the report's findings read them), not the flags'
    assert results["options"] == {"scale": 0.1, "bit": "exponent-msb", "prob": 1.0}
    selections = [c["selection"] for c in results["conditions"]]
    assert selections == ["top_k", "random_k", "random_k", "bottom_k"]
    for condition in results["conditions"]:
        for key in ("selection", "seed", "method", "n_weights", "perplexity", "nll",
                    "token_accuracy", "delta_perplexity", "ppl_ratio"):
            assert key in condition
        assert condition["n_weights"] == 5
        # the built-in model holds ~33k exact zeros that every metric scores lowest: bottom-K is
        # drawn among the weights zeroing changes, so it changes all K of them
        assert condition["n_changed"] == 5 and condition["vacuous"] is False
    stats = read(out / "sensitivity_stats.json")
    some = next(iter(stats["parameters"].values()))
    assert {"layer", "component", "numel", "mean", "std", "min", "max", "p50", "p95",
            "p99"} <= set(some)
    assert stats["tied_parameters"] == {"lm_head.weight": "model.embed_tokens.weight"}
    stability = read(out / "stability_results.json")
    assert len(stability["across_batches"]["jaccard"]["pairs"]) == 3
    assert stability["k"] == 5


@pytest.mark.slow
def test_manifest_content_and_secret_redaction(full_runs):
    out, _ = full_runs[0]
    manifest = read(out / "experiment_manifest.json")
    assert manifest["success"] is True and manifest["status"] == "succeeded"
    assert "MY_SERVICE_TOKEN" not in manifest["environment"]["variables"]  # not allowlisted
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


@pytest.mark.slow
def without_wall_clock(value):
    """``value`` without its "seconds" entries (each condition's wall-clock time)."""
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


def test_same_seeds_give_identical_numbers(full_runs):
    (first, _), (second, _) = full_runs
    for name in ("perturbation_results.json", "stability_results.json", "sensitivity_stats.json"):
        assert without_wall_clock(read(first / name)) == without_wall_clock(read(second / name)), name
    assert (first / "top_weights.csv").read_text() == (second / "top_weights.csv").read_text()


def test_manifest_outside_a_git_checkout(tmp_path):
    from src.utils.manifest import git_state
    state = git_state(tmp_path)
    assert state["available"] is False and "not inside a git checkout" in state["reason"]


def expect_user_error(args, out_dir, match, capsys):
    """In process (no interpreter start): exit 2 and exactly one line naming the problem. With
    --overwrite: a previous run in ``out_dir`` is only replaced once a good run starts."""
    assert main([*map(str, args), "--out-dir", str(out_dir), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]


TINY = ["--model", "random:tiny-llama", "--device", "cpu"]


@pytest.fixture
def existing_run(tmp_path):
    """A folder holding another run's file, which no rejected invocation may touch."""
    out = tmp_path / "existing_run"
    out.mkdir()
    (out / "config.json").write_text('{"keep": true}')
    return out


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_error_cases_exit_2_with_one_line_and_keep_existing_outputs(tmp_path, existing_run,
                                                                    capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _files(existing_run)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words.\n\nand a few more.\n")
    cases = [
        (["--model", "./no/such/model"], "does not exist"),
        (["--model", "nobody-has-this/model-xyz"], "could not be loaded from the Hugging Face hub"),
        ([*TINY, "--data-file", empty], "empty"),
        ([*TINY, "--data-file", tmp_path / "missing.txt"], "does not exist"),
        ([*TINY, "--data-file", short, "--max-length", "128"], "data too short"),
        ([*TINY, "--max-length", "4096"], "exceeds the model's context"),
        ([*TINY, "--device", "tpu"], "bad --device"),
        ([*TINY, "--metric", "nonsense"], "unknown --metric"),
        ([*TINY, "--mode", "sideways"], "unknown --mode"),
        ([*TINY, "--topk", "0"], "--topk must be at least 1"),
        ([*TINY, "--topk", "100000000"], "larger than"),
        ([*TINY, "--perturb", "melt"], "unknown --perturb"),
        ([*TINY, "--perturb", "bit_flip", "--bit-position", "99"], "outside"),
        ([*TINY, "--perturb", "zero", "--controls", "everything"], "unknown --controls entry"),
        ([*TINY, "--no-such-flag"], "unrecognized arguments"),
    ]
    for args, match in cases:
        expect_user_error(args, existing_run, match, capsys)
        assert _files(existing_run) == before, args
    as_file = tmp_path / "a_file"
    as_file.write_text("x")
    expect_user_error(TINY, as_file, "is a file", capsys)
    assert as_file.read_text() == "x"


@pytest.mark.parametrize("args, match", [
    (["--stability-check", "--stability-fraction", "0"], "--stability-fraction must be in (0, 1]"),
    (["--stability-check", "--stability-batches", "1"], "--stability-batches must be at least 2"),
    (["--stability-check", "--max-samples", "2"], "--stability-batches 3 needs at least as many"),
    (["--stability-check", "--max-length", "512", "--max-samples", "100", "--stability-batches",
      "12"], "--stability-batches 12 needs as many calibration blocks, but the data gave 11"),
    (["--stability-fraction", "0.3"], "--stability-fraction has no effect without "
                                      "--stability-check or --temporal-stability"),
    (["--stability-batches", "4"], "--stability-batches has no effect without"),
    (["--weight-analysis", "--n-clusters", "50"], "--n-clusters 50 exceeds the 14 scored"),
    (["--temporal-stability", "--conditions-data", "NOT_UTF8"],
     "--conditions-data 'NOT_UTF8' is not UTF-8 text"),
    (["--perturb", "gauss_noise", "--perturb-scale", "nan"], "--perturb-scale must be a finite"),
    (["--perturb", "gauss_noise", "--perturb-scale", "inf"], "--perturb-scale must be a finite"),
    (["--perturb", "bit_flip", "--perturb-prob", "nan"], "--perturb-prob must be a finite"),
    (["--temporal-stability", "--drift-threshold=-inf"], "--drift-threshold must be a finite"),
    (["--perturb-scale", "0.2"], "--perturb-scale has no effect without --perturb gauss_noise"),
    (["--hutchinson-samples", "4"], "--hutchinson-samples has no effect without hutchinson_diag"),
    (["--metric", "magnitude", "--gradient-checkpointing"],
     "--gradient-checkpointing has no effect without a gradient metric"),
    (["--metric", "hutchinson_diag", "--hutchinson-rel-stderr", "0.2"],
     "--hutchinson-rel-stderr has no effect without --hutchinson-samples auto"),
    (["--metric", "hutchinson_diag", "--hutchinson-samples", "many"],
     "--hutchinson-samples must be an integer (got 'many')"),
    (["--metric", "hutchinson_diag", "--hutchinson-samples", "auto",
      "--hutchinson-rel-stderr", "0"], "--hutchinson-rel-stderr must be > 0"),
    (["--bit-format", "int4"], "--bit-format has no effect without --fault-injection or "
                               "--bit-search"),
    (["--bit-search", "3", "--bit-format", "int5"], "unknown --bit-format 'int5'"),
    (["--fault-injection", "5", "--bit-format", "int8", "--bit-position", "sign"],
     "bad --bit-position: bit position 'sign' does not name a bit of 8-bit unsigned"),
    (["--fault-injection", "5", "--bit-format", "int4", "--bit-position", "4"],
     "bit position 4 is outside 0..3 for int4 codes"),
    (["--fault-injection", "5", "--bit-position", "exponent-msb", "--bit-format", "int8",
      "--quant-symmetric"], "does not name a bit of 8-bit symmetric"),
    (["--bit-search", "2", "--critical-ratio", "3"], "--critical-ratio has no effect without "
                                                     "--fault-injection"),
    (["--bit-position", "3"], "--bit-position has no effect without --perturb bit_flip or "
                              "--fault-injection"),
])
def test_bad_settings_exit_2_before_the_output_folder_is_touched(args, match, tmp_path,
                                                                  existing_run, capsys):
    args = [str(tmp_path / "bad.txt") if a == "NOT_UTF8" else a for a in args]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    match = match.replace("NOT_UTF8", str(tmp_path / "bad.txt"))
    before = _files(existing_run)
    expect_user_error([*TINY, "--max-length", "32", "--max-samples", "4", *args], existing_run,
                      match, capsys)
    assert _files(existing_run) == before


def test_the_real_entry_point_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(RUNNER), "--topk", "0", "--out-dir",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr == "error: --topk must be at least 1 (got 0)\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
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


def test_parsing_reads_no_file_and_a_missing_scores_from_is_refused_after_it(tmp_path, capsys,
                                                                             monkeypatch):
    """from_flags reads no file (a --scores-from that does not exist parses); the stored
    scores' metric (--metric's default) is read after parsing, and validation checks it."""
    from src.cli import build_parser
    from src.config import RunConfig
    from src.errors import UserError
    from src.sensitivity import score_store

    missing = str(tmp_path / "nowhere")
    given = vars(build_parser().parse_args(["--scores-from", missing]))
    with monkeypatch.context() as patched:
        patched.setattr(score_store, "read_meta", lambda path: pytest.fail("parsing read a file"))
        config = RunConfig.from_flags(given)
    assert (config.scores_from, config.metric, config.out_dir) == (missing, "grad_x_weight", "")
    with pytest.raises(UserError, match="not a readable scores.safetensors"):
        config.with_file_defaults(metric_given=False)
    completed = config.with_file_defaults(metric_given=True)
    assert "grad_x_weight" in completed.out_dir
    with pytest.raises(UserError, match="not a readable scores.safetensors"):
        completed.validate()
    for extra in ([], ["--metric", "magnitude"]):
        assert main(["--scores-from", missing, *extra, "--out-dir", str(tmp_path / "run")]) == 2
        assert "not a readable scores.safetensors" in capsys.readouterr().err


def test_hutchinson_auto_samples_are_stated_in_console_manifest_scores_and_report(tmp_path,
                                                                                  capsys):
    from src.report.build import run_section
    from src.report.document import Doc
    from src.report.run_folder import RunFolder
    from src.sensitivity import score_store

    out = tmp_path / "run"
    assert main([*TINY, "--max-samples", "4", "--max-length", "32", "--metric",
                 "hutchinson_diag", "--hutchinson-samples", "auto", "--hutchinson-max-samples",
                 "8", "--hutchinson-rel-stderr", "1e-6", "--topk", "5", "--save-scores",
                 "--out-dir", str(out)]) == 0
    console = capsys.readouterr().out
    facts = json.loads((out / "experiment_manifest.json").read_text())["score_facts"]
    assert facts["metric"] == "hutchinson_diag" and facts["samples"] == "auto"
    assert facts["probes_per_batch"] == 8 and facts["reached"] is False  # the cap stopped it
    assert score_store.read_meta(out / score_store.FILE_NAME)["facts"] == \
        {k: v for k, v in facts.items() if k != "metric"}
    assert "hutchinson_diag: 8 probes per calibration batch" in console
    assert "NOT reached: the cap stopped it" in console
    doc = Doc()
    run_section(doc, RunFolder.read(out))
    assert any("8 probes per calibration batch" in str(block) for block in doc.blocks)
