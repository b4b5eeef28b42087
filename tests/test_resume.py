"""--resume and --scores-from: a killed run continues where it stopped, and a new experiment uses
stored scores instead of scoring, refusing scores that do not fit it."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from src.cli import config_from_argv, main
from src.errors import UserError
from src.sensitivity import score_store
from src.utils.io import file_sha256
from tests.test_hostile import MANY_SEEDS, TINY, files_of, start_run, strict_json, wait_for

SEEDS = ["--seeds", MANY_SEEDS]
PERTURB = [*TINY, "--max-samples", "16", "--perturb", "zero", *SEEDS]  # long enough to kill
SCORED = [*TINY, "--max-samples", "16", "--perturb", "zero", "--seeds", "0"]


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def condition_rows(folder) -> list[dict]:
    """The perturbation rows without their wall-clock seconds."""
    rows = strict_json(folder / "perturbation_results.json")["conditions"]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    assert main([*PERTURB, "--save-scores", "--out-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A short succeeded run that kept its scores."""
    out = tmp_path_factory.mktemp("resume") / "scored"
    assert main([*SCORED, "--save-scores", "--out-dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_sigkill_during_perturbation_then_resume_equals_an_uninterrupted_run(
        tmp_path, uninterrupted, capsys):
    out = tmp_path / "killed"
    run = start_run(*PERTURB, "--out-dir", out)
    wait_for((out / "perturbation_results.json").exists)
    run.kill()
    run.communicate(timeout=60)
    assert (out / score_store.FILE_NAME).is_file()
    finished = len(strict_json(out / "perturbation_results.json")["conditions"])

    code, stdout, stderr = run_main(capsys, *PERTURB, "--out-dir", out, "--resume")
    assert code == 0, stderr
    assert "scores loaded from" in stdout and "scoring skipped" in stdout
    assert condition_rows(out) == condition_rows(uninterrupted)
    assert (out / "top_weights.csv").read_bytes() == (uninterrupted / "top_weights.csv").read_bytes()
    manifest = strict_json(out / "experiment_manifest.json")
    assert manifest["status"] == "succeeded"
    assert not any(step.startswith("score_") for step in manifest["timings_seconds"])
    resumed = manifest["resumed"]
    assert resumed["from_status"] == "running" and resumed["previous_pid"] == run.pid
    assert resumed["kept"]["scores"] and resumed["kept"]["perturbation_conditions"] == finished
    assert resumed["resumed_at_step"] == f"perturbation condition {finished + 1} of 32"
    assert resumed["seconds_saved"] > 0
    assert not (out / score_store.FILE_NAME).exists()  # resume state goes after success


@pytest.mark.slow
def test_sigkill_during_scoring_then_resume_scores_again(tmp_path, capsys):
    args = [*TINY, "--max-samples", "16", "--metric", "hutchinson_diag",
            "--hutchinson-samples", "16", "--perturb", "zero", "--seeds", "0"]
    out = tmp_path / "killed"
    run = start_run(*args, "--out-dir", out)
    wait_for((out / "experiment_manifest.json").exists)
    run.kill()
    run.communicate(timeout=60)
    assert not (out / score_store.FILE_NAME).exists(), "killed too late: scoring had finished"

    code, stdout, stderr = run_main(capsys, *args, "--out-dir", out, "--resume")
    assert code == 0, stderr
    assert "scores loaded" not in stdout
    manifest = strict_json(out / "experiment_manifest.json")
    assert "score_hutchinson_diag" in manifest["timings_seconds"]
    assert manifest["resumed"]["kept"].get("scores") is None
    whole = tmp_path / "whole"
    assert main([*args, "--out-dir", str(whole)]) == 0
    assert (out / "top_weights.csv").read_bytes() == (whole / "top_weights.csv").read_bytes()
    assert condition_rows(out) == condition_rows(whole)


def test_resume_refuses_what_it_cannot_continue(tmp_path, scored_run, capsys):
    before = files_of(scored_run)
    code, _, err = run_main(capsys, *SCORED, "--out-dir", scored_run, "--resume")
    assert code == 2 and "succeeded" in err and "--overwrite" in err
    code, _, err = run_main(capsys, *SCORED, "--out-dir", tmp_path / "nothing", "--resume")
    assert code == 2 and "no run to continue" in err
    assert not (tmp_path / "nothing").exists()

    failed = tmp_path / "failed"
    shutil.copytree(scored_run, failed)
    manifest = json.loads((failed / "experiment_manifest.json").read_text())
    (failed / "experiment_manifest.json").write_text(json.dumps({**manifest,
                                                                 "status": "failed"}))
    changed = [a if a != "zero" else "sign_flip" for a in SCORED]
    code, _, err = run_main(capsys, *changed, "--topk", "5", "--out-dir", failed, "--resume")
    assert code == 2 and err.count("\n") == 1
    assert "--perturb: now sign_flip, the run had zero" in err and "--topk: now 5" in err
    code, _, err = run_main(capsys, *SCORED, "--out-dir", failed, "--resume", "--overwrite")
    assert code == 2 and "not both" in err
    assert files_of(scored_run) == before


def test_a_run_from_before_a_flag_existed_resumes_at_that_flags_default(tmp_path, scored_run):
    failed = tmp_path / "failed"
    shutil.copytree(scored_run, failed)
    manifest = json.loads((failed / "experiment_manifest.json").read_text())
    (failed / "experiment_manifest.json").write_text(json.dumps({**manifest, "status": "failed"}))
    saved = json.loads((failed / "config.json").read_text())
    del saved["scores_from_other_data"]  # written by a version that did not have the flag
    (failed / "config.json").write_text(json.dumps(saved))
    config_from_argv([*SCORED, "--save-scores", "--out-dir", str(failed), "--resume"])  # no refusal
    with pytest.raises(UserError, match="--scores-from-other-data: now True"):
        config_from_argv([*SCORED, "--save-scores", "--scores-from", str(scored_run),
                          "--scores-from-other-data",
                          "--out-dir", str(failed), "--resume"])


def test_scores_from_the_same_run_gives_identical_top_weights(tmp_path, scored_run, capsys):
    out = tmp_path / "reused"
    code, stdout, stderr = run_main(capsys, *TINY, "--max-samples", "16", "--scores-from",
                                    scored_run, "--out-dir", out)
    assert code == 0, stderr
    assert "scoring skipped" in stdout
    assert (out / "top_weights.csv").read_bytes() == (scored_run / "top_weights.csv").read_bytes()
    manifest = strict_json(out / "experiment_manifest.json")
    source = manifest["scores_source"]
    assert source["path"] == str(scored_run / score_store.FILE_NAME)
    assert source["sha256"] == file_sha256(scored_run / score_store.FILE_NAME)
    assert manifest["config"]["metric"] == "grad_x_weight"  # taken from the file
    assert not any(step.startswith("score_") for step in manifest["timings_seconds"])


@pytest.mark.parametrize("change, message", [
    (["--model", "random:tiny-gpt2"], "another model"),
    (["--metric", "magnitude"], "--scores-from holds grad_x_weight scores but --metric is "
                                "magnitude"),
    (["--layers", "0"], "another set of weights"),
    (["--include-embeddings"], "another set of weights"),
])
def test_scores_from_what_does_not_fit_exits_2(tmp_path, scored_run, capsys, change,
                                               message):
    out = tmp_path / "refused"
    args = [*TINY, "--max-samples", "16", *change, "--scores-from", scored_run,
            "--out-dir", out]
    code, _, err = run_main(capsys, *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_scores_from_a_file_that_is_not_scores_exits_2(tmp_path, scored_run, capsys):
    code, _, err = run_main(capsys, *TINY, "--scores-from", scored_run / "top_weights.csv",
                            "--out-dir", tmp_path / "a")
    assert code == 2 and "not a readable scores.safetensors" in err
    code, _, err = run_main(capsys, *TINY, "--scores-from", tmp_path / "missing",
                            "--out-dir", tmp_path / "b")
    assert code == 2 and "missing" in err and err.count("\n") == 1


def test_stored_scores_from_another_model_are_rescored_on_resume(tmp_path, scored_run,
                                                                 capsys):
    """A resumed run whose own scores file does not fit (here: another model's) scores again."""
    other = tmp_path / "gpt2"
    assert main([*TINY, "--model", "random:tiny-gpt2", "--save-scores", "--out-dir",
                 str(other)]) == 0
    out = tmp_path / "mixed"
    shutil.copytree(scored_run, out)
    shutil.copy(other / score_store.FILE_NAME, out / score_store.FILE_NAME)
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    (out / "experiment_manifest.json").write_text(json.dumps({**manifest, "status": "failed"}))
    code, stdout, stderr = run_main(capsys, *SCORED, "--save-scores", "--out-dir", out,
                                    "--resume")
    assert code == 0, stderr
    assert "do not fit (they score another model" in stdout and "scoring again" in stdout
    assert (out / "top_weights.csv").read_bytes() == (scored_run / "top_weights.csv").read_bytes()


def test_the_fingerprint_samples_the_last_value_of_a_large_tensor():
    """Integer positions: float ones rounded past the end of the built-in model's 28,311,552-value
    embedding (float32 cannot hold 28,311,551)."""
    model = torch.nn.Module()
    model.embed = torch.nn.Parameter(torch.zeros(28_311_552))
    first = score_store.model_fingerprint(model)
    model.embed.data[-1] = 1.0
    assert score_store.model_fingerprint(model) != first and len(first) == 64


@pytest.mark.parametrize("metric, subset, seed, reused", [
    ("magnitude", [0], 5, True),           # data-free and seed-free: every subset repeats it
    ("random", [0], 0, True),              # data-free, the run's seed
    ("random", [0], 1, False),             # another seed draws other scores
    ("grad_x_weight", [0, 1, 2, 3], 7, True),   # all blocks (the seed does not matter)
    ("grad_x_weight", [0, 1], 0, False),   # a subset of the data
    ("hutchinson_diag", [0, 1, 2, 3], 0, True),
    ("hutchinson_diag", [0, 1, 2, 3], 1, False),
])
def test_stability_reuses_the_run_scores_only_where_rescoring_would_repeat_them(
        tiny_llama, metric, subset, seed, reused, monkeypatch):
    from src.data.loading import TokenBlocks
    from src.sensitivity import stability
    from src.sensitivity.scoring import ScoringJob

    blocks = TokenBlocks(torch.randint(0, 100, (4, 8)), torch.ones(4, 8, dtype=torch.long))
    params = {n: p for n, p in tiny_llama.model.named_parameters() if "mlp" in n}
    job = ScoringJob(model=tiny_llama.model, params=params, blocks=blocks, seed=0)
    main_scores = {n: torch.rand(p.shape) for n, p in params.items()}
    calls = []
    monkeypatch.setattr(stability, "compute_scores",
                        lambda j, m: calls.append(m) or SimpleNamespace(scores=main_scores))
    scores, _ = stability._score_subset(job, metric, subset, seed, 3, "global",
                                        main_scores=main_scores)
    assert (calls == []) is reused
    assert stability.same_as_main(job, metric, subset, seed) is reused


def test_large_scores_are_kept_for_resume_only_when_recomputing_costs_more():
    from src.pipeline import worth_keeping_for_resume
    from src.sensitivity.scoring import MetricOutput

    def output(n_values):  # meta tensors: sizes without memory
        return MetricOutput({"w": torch.empty(n_values, device="meta")})
    small, large = output(1000), output(2_500_000_000)  # 4 kB; 10 GB, ~33 s to write
    assert worth_keeping_for_resume(small, 0.0)
    assert not worth_keeping_for_resume(large, 3.0)
    assert worth_keeping_for_resume(large, 600.0)
    with_stderr = MetricOutput(large.scores, {"stderr": {"w": torch.empty(2_500_000_000,
                                                                           device="meta")}})
    assert not worth_keeping_for_resume(with_stderr, 60.0)  # 20 GB with the standard errors


def test_safetensors_written_tensor_by_tensor_read_by_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from src.utils.io import write_safetensors

    tensors = {"b": torch.randn(3, 4), "a": torch.randn(5).to(torch.bfloat16),
               "empty": torch.empty(0, 4), "ids": torch.arange(7), "half": torch.randn(2, 3).half(),
               "scalar": torch.tensor(1.5), "grid": torch.randn(4, 6)[:, ::2]}  # not contiguous
    path = write_safetensors(tmp_path / "t.safetensors", tensors, {"cwa": '{"k": 1}'})
    read = load_file(path)
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"cwa": '{"k": 1}'}
        assert torch.equal(handle.get_slice("b")[1:3], tensors["b"][1:3])
