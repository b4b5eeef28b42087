"""Studies (src/study/): the study file, content-addressed ids, the corrections, a study killed
with SIGKILL and run again (by two processes at once), submitit's local executor, and what the
trackers hold, read back with their own clients."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from src.errors import UserError
from src.study import aggregate, spec
from src.study.cli import main as study_main
from src.study.state import StudyFolder
from tests.conftest import ROOT

TINY_RUN = {"model": "random:tiny-llama", "max-length": 16, "max-samples": 2, "batch-size": 2,
            "seeds": [0, 1], "mode": "global", "save-plots": False}
TWELVE = {"name": "twelve", "base": TINY_RUN,
          "grid": {"metric": ["magnitude", "grad_x_weight", "act_mag"], "topk": [1, 5],
                   "perturb": ["zero", "sign_flip"]}}


def write_study(folder: Path, document: dict) -> Path:
    import yaml

    path = folder / f"{document['name']}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def study_process(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "src.study", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def attempts(folder: StudyFolder, run_id: str) -> list[str]:
    """The commands the run was started with, one per attempt (the log's headers)."""
    log = folder.log(run_id)
    return [line for line in log.read_text().splitlines() if line.startswith("=== ")] \
        if log.is_file() else []


# ----------------------------------------------------------------------------- corrections

def test_holm_and_benjamini_hochberg_against_hand_computation_and_scipy():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04;
    # running maximum 0.02, 0.03, 0.06, 0.06; back in input order:
    assert np.allclose(aggregate.holm(p), [0.03, 0.06, 0.06, 0.02])
    # BH by hand: sorted times 4/rank = 0.02, 0.02, 0.04, 0.04; running minimum from the top
    assert np.allclose(aggregate.benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    rng = np.random.default_rng(0)
    for m in (1, 2, 7, 40):
        values = rng.uniform(0, 0.2, m) ** 2
        assert np.allclose(aggregate.benjamini_hochberg(values),
                           false_discovery_control(values, method="bh"))
        assert np.allclose(aggregate.holm(values), _holm_loop(values))
        assert np.all(aggregate.holm(values) >= values) and np.all(aggregate.holm(values) <= 1)


def _holm_loop(p) -> list[float]:
    """Holm's procedure written out: the i-th smallest p (1-based) times m - i + 1, never below
    the adjusted value before it, at most 1."""
    m, order, out, running = len(p), sorted(range(len(p)), key=lambda i: p[i]), [0.0] * len(p), 0
    for position, index in enumerate(order, start=1):
        running = max(running, min(1.0, (m - position + 1) * p[index]))
        out[index] = running
    return out


def test_corrections_cover_one_test_per_run_and_experiment():
    table = pd.DataFrame([
        {"run_id": "a", "experiment": "perturbation", "selection": "top_k", "p": 0.01},
        {"run_id": "a", "experiment": "perturbation", "selection": "random_k", "p": 0.01},
        {"run_id": "b", "experiment": "perturbation", "selection": "top_k", "p": 0.04},
        {"run_id": "b", "experiment": "baseline", "selection": None, "p": None}])
    corrected = aggregate.with_corrections(table)
    assert list(corrected["p_holm"][:3]) == pytest.approx([0.02, 0.02, 0.04])
    assert list(corrected["p_bh"][:3]) == pytest.approx([0.02, 0.02, 0.04])
    assert np.isnan(corrected["p_holm"].iloc[3])


def test_compression_conditions_become_rows_with_their_kept_set_and_test():
    from src.report.run_folder import RunFolder

    baseline = {"perplexity": 10.0, "nll": 2.3, "token_accuracy": 0.4, "n_tokens": 30}
    conditions = [{"condition": "rtn", "kept": "none", "seed": None, "perplexity": 12.0,
                   "recovery": 0.0, "seconds": 1.5},
                  {"condition": "rtn_keep_top_k", "kept": "top_k", "seed": None,
                   "perplexity": 10.5, "recovery": 0.75, "delta_perplexity_ci95": [0.1, 0.9]},
                  {"condition": "rtn_keep_random_k", "kept": "random_k", "seed": 3,
                   "perplexity": 11.9, "recovery": 0.05}]
    run = RunFolder(Path("x"), {}, quantization={
        "baseline": baseline, "conditions": conditions,
        "summary": {"top_vs_random": {"z_score": 4.0, "empirical_p_value": 0.25,
                                      "difference": 0.7}}})
    rows = aggregate.run_rows(run, "abc", "quantize=4", {"quantize": 4})
    assert [(r["experiment"], r["condition"], r["selection"]) for r in rows] == [
        ("baseline", "baseline", "baseline"), ("quantization", "rtn", "none"),
        ("quantization", "rtn_keep_top_k", "top_k"),
        ("quantization", "rtn_keep_random_k/seed3", "random_k")]
    assert rows[2]["delta_perplexity_ci95_low"] == 0.1 and rows[2]["p"] == 0.25
    assert rows[2]["recovery_difference"] == 0.7 and rows[0]["perplexity"] == 10.0
    assert all("seconds" not in row for row in rows)  # no timing: resumed tables compare equal


# ----------------------------------------------------------------------------- study file

def test_study_file_expands_grid_zip_and_repeats_with_stable_content_ids(tmp_path):
    document = {"name": "s", "base": TINY_RUN, "grid": {"topk": [1, 5]},
                "zip": {"metric": ["magnitude", "act_mag"], "perturb": ["zero", "sign_flip"]},
                "repeats": 2}
    study = spec.from_document(document, default_name="s")
    spec.validate(study, tmp_path)
    assert len(study.runs) == 2 * 2 * 2 and study.axes == ["topk", "metric", "perturb",
                                                          "repeat"]
    first = study.runs[0]
    assert first.varying == {"topk": 1, "metric": "magnitude", "perturb": "zero", "repeat": 0}
    assert study.runs[1].config.seeds == (2, 3)  # repeat 1: disjoint control seeds
    again = spec.from_document(document, default_name="s")
    spec.validate(again, tmp_path / "elsewhere")  # the folder is not part of the id
    assert [r.id for r in again.runs] == [r.id for r in study.runs]
    assert len({r.id for r in study.runs}) == len(study.runs)
    text = tmp_path / "text.txt"
    text.write_text("Some words to read.\n\nMore words to read here.\n")
    other = spec.from_document({**document, "base": {**TINY_RUN, "data-file": str(text)}},
                               default_name="s")
    spec.validate(other, tmp_path)
    assert other.runs[0].id != first.id
    text.write_text("Other words entirely.\n\nAnd a second document.\n")
    spec._SHA256.clear()
    changed = spec.from_document({**document, "base": {**TINY_RUN, "data-file": str(text)}},
                                 default_name="s")
    spec.validate(changed, tmp_path)
    assert changed.runs[0].id != other.runs[0].id  # the text's content is in the id


@pytest.mark.parametrize("document, message", [
    ({"base": {"topk": 0}}, "study run 'base': --topk must be at least 1"),
    ({"grid": {"topk": [5, -1]}}, "study run 'topk=-1': --topk must be at least 1"),
    ({"base": {"no-such-flag": 1}}, "'no-such-flag' in base is not a flag"),
    ({"base": {"out-dir": "x"}}, "'out-dir' in base is decided by the study"),
    ({"zip": {"topk": [1, 2], "metric": ["magnitude"]}}, "equal lengths"),
    ({"grid": {"topk": 5}}, "needs a non-empty list"),
    ({"repeats": 0}, "repeats must be an integer >= 1"),
    ({"grids": {}}, "unknown section 'grids'"),
])
def test_bad_study_files_are_one_line_errors(tmp_path, document, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        study = spec.from_document({"base": dict(TINY_RUN), **document}
                                   if "base" not in document else
                                   {**document, "base": {**TINY_RUN, **document["base"]}},
                                   default_name="bad")
        spec.validate(study, tmp_path)


def test_study_cli_bad_input_exits_2_without_traceback(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: [unclosed\n")
    assert study_main(["plan", str(broken), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study file") and "Traceback" not in err
    good = write_study(tmp_path, {"name": "g", "base": TINY_RUN})
    assert study_main(["run", str(good), "--executor", "nowhere"]) == 2
    if shutil.which("sbatch") is None:
        capsys.readouterr()
        assert study_main(["run", str(good), "--executor", "slurm", "--out",
                           str(tmp_path / "s")]) == 2
        assert "the slurm executor needs Slurm" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- kill and resume

@pytest.mark.slow
def test_a_study_killed_with_sigkill_resumes_only_unfinished_runs(tmp_path):
    study_file = write_study(tmp_path, TWELVE)
    reference = study_process("run", study_file, "--out", tmp_path / "reference")
    assert reference.wait(timeout=900) == 0, reference.stdout.read()
    killed = study_process("run", study_file, "--out", tmp_path / "killed")
    folder = StudyFolder(tmp_path / "killed")
    study = spec.load(study_file)
    spec.validate(study, folder.root)
    ids = [run.id for run in study.runs]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # mid-way: 5 runs done and another one in its steps
        states = [folder.state(i) for i in ids]
        started = [i for i in ids if (folder.manifest(i) or {}).get("status") == "running"]
        if states.count("done") >= 5 and started:
            break
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    _wait_until_no_run_is_running(folder, ids)
    done_before = {i for i in ids if folder.state(i) == "done"}
    cut_short = [i for i in ids if folder.has_partial_run(i)]
    assert 5 <= len(done_before) < 12 and len(cut_short) == 1

    # run again, by two study processes at once on the same folder
    again = [study_process("run", study_file, "--out", folder.root) for _ in range(2)]
    outputs = [process.communicate(timeout=900)[0] for process in again]
    assert {process.returncode for process in again} == {0}, outputs
    for run_id in ids:
        commands = attempts(folder, run_id)
        if run_id in done_before:
            assert len(commands) == 1, (run_id, commands)  # never run again
        elif run_id in cut_short:
            assert len(commands) == 2 and "--resume" in commands[1]
        else:
            assert len(commands) == 1, (run_id, commands)  # run once, by one of the two
    sharing = [json.loads(folder.argv_file(i).read_text()) for i in ids]
    assert sum("--scores-from" in argv for argv in sharing) >= 6  # 3 scorings for 12 runs

    expected = pd.read_csv(tmp_path / "reference" / "study.csv")
    resumed = pd.read_csv(folder.root / "study.csv")
    pd.testing.assert_frame_equal(resumed, expected, check_exact=True)
    assert set(expected["run_id"]) == set(ids)
    assert len(pd.read_parquet(folder.root / "study.parquet")) == len(expected)
    assert (folder.root / "report" / "study_report.md").is_file()


def _wait_until_no_run_is_running(folder: StudyFolder, ids: list[str]) -> None:
    """The killed study's child got SIGTERM (it dies with its parent): it records itself as
    interrupted and lets go of its folder."""
    deadline = time.monotonic() + 120
    while any(folder.state(i) == "running" for i in ids):
        assert time.monotonic() < deadline, "a run outlived its killed study"
        time.sleep(0.2)


# ----------------------------------------------------------------------------- executors, trackers

PAIR = {"name": "pair", "base": {**TINY_RUN, "metric": "magnitude", "perturb": "zero",
                                 "save-plots": True},
        "grid": {"topk": [1, 5]}, "executor": {"kind": "submitit-local", "time": 20}}


@pytest.mark.slow
def test_submitit_local_runs_a_study_that_mlflow_and_tensorboard_read_back(tmp_path, capsys):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study_file = write_study(tmp_path, PAIR)
    out = tmp_path / "pair"
    assert study_main(["run", str(study_file), "--out", str(out), "--report-to", "mlflow"]) == 0
    assert "submitted 2 submitit-local job(s)" in capsys.readouterr().out
    assert study_main(["report", str(study_file), "--out", str(out),
                       "--report-to", "tensorboard"]) == 0
    study = spec.load(study_file)
    spec.validate(study, out)
    folder = StudyFolder(out)
    assert len(list((out / "slurm").glob("*/*_result.pkl"))) == 2  # one submitit job per run

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pair")
    tracked = {r.data.params["run_id"]: r for r in
               client.search_runs([experiment.experiment_id])}
    assert sorted(tracked) == sorted(run.id for run in study.runs)
    for run in study.runs:
        results = json.loads((folder.run_dir(run.id) / "perturbation_results.json").read_text())
        top = next(row for row in results["conditions"] if row["selection"] == "top_k")
        logged = tracked[run.id]
        assert logged.data.params["topk"] == str(run.config.topk)
        assert logged.data.tags["study"] == "pair"
        assert logged.data.metrics["baseline/perplexity"] == results["baseline"]["perplexity"]
        assert logged.data.metrics["perturbation/top_k/perplexity"] == top["perplexity"]
        assert logged.data.metrics["perturbation/top_vs_random/empirical_p_value"] == \
            results["summary"]["top_vs_random"]["empirical_p_value"]
        artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
        assert {"config.json", "perturbation_results.json", "top_weights.csv",
                "plots"} <= artifacts
        assert [a for a in client.list_artifacts(logged.info.run_id, "plots")
                if a.path.endswith(".png")]
        copy = client.download_artifacts(logged.info.run_id, "perturbation_results.json",
                                         str(tmp_path))
        assert json.loads(Path(copy).read_text()) == results

        events = EventAccumulator(str(out / "tensorboard" / "pair" / f"{run.label} [{run.id}]"),
                                  size_guidance={"images": 0, "tensors": 0})
        events.Reload()
        assert events.Scalars("baseline/perplexity")[0].value == \
            pytest.approx(results["baseline"]["perplexity"], rel=1e-6)
        assert events.Scalars("perturbation/top_k/perplexity")[0].value == \
            pytest.approx(top["perplexity"], rel=1e-6)
        assert any(tag.startswith("plots/") for tag in events.Tags()["images"])


def test_a_single_run_logs_itself_to_mlflow_beside_its_folder(tmp_path, capsys):
    from mlflow import MlflowClient

    from src.cli import main

    out = tmp_path / "runs" / "one"
    assert main(["--model", "random:tiny-llama", "--metric", "magnitude", "--topk", "3",
                 "--max-length", "16", "--max-samples", "2", "--perturb", "zero", "--seeds",
                 "0,1", "--out-dir", str(out), "--report-to", "mlflow", "--quiet"]) == 0
    assert "[cwa] tracked: mlflow run" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("critical-weight-analysis")
    (logged,) = client.search_runs([experiment.experiment_id])
    results = json.loads((out / "perturbation_results.json").read_text())
    assert logged.info.run_name == "one" and logged.data.params["metric"] == "magnitude"
    assert logged.data.metrics["baseline/nll"] == results["baseline"]["nll"]
    assert (tmp_path / "runs" / "mlartifacts").is_dir()


def test_a_single_run_logs_itself_to_wandb_offline(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    from src.cli import main

    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "one"
    assert main(["--model", "random:tiny-llama", "--metric", "magnitude", "--topk", "3",
                 "--max-length", "16", "--max-samples", "2", "--perturb", "zero", "--seeds",
                 "0,1", "--out-dir", str(out), "--report-to", "wandb", "--tracking-uri",
                 str(tmp_path / "wb"), "--quiet"]) == 0
    assert "offline" in capsys.readouterr().err
    (offline,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert (offline / "files" / "perturbation_results.json").read_bytes() == \
        (out / "perturbation_results.json").read_bytes()
    assert next(offline.glob("run-*.wandb")).stat().st_size > 0


def test_a_tracker_that_is_not_installed_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import importlib.util

    from src.cli import main
    from src.report import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))
    out = tmp_path / "never"
    assert main(["--model", "random:tiny-llama", "--report-to", "wandb", "--out-dir",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "--report-to wandb needs the wandb package" in err and "[tracking]" in err
    assert not out.exists()
    assert main(["--model", "random:tiny-llama", "--tracking-uri", "x", "--out-dir",
                 str(out)]) == 2
    assert "--tracking-uri has no effect without --report-to" in capsys.readouterr().err


@pytest.mark.slow
def test_the_torchrun_executor_runs_each_run_on_n_processes_sharded_where_asked(tmp_path):
    """(That a sharded run equals one process is tests/test_sharding.py's; here: the engine.)"""
    document = {"name": "ranks", "base": {**TINY_RUN, "metric": "grad_x_weight", "topk": 3,
                                          "perturb": "zero", "shard": True},
                "executor": {"kind": "torchrun", "nproc": 2}}
    study_file = write_study(tmp_path, document)
    assert study_main(["run", str(study_file), "--out", str(tmp_path / "ranks")]) == 0
    study = spec.load(str(study_file))
    spec.validate(study, tmp_path)
    folder = StudyFolder(tmp_path / "ranks")
    (run,) = study.runs
    assert "torch.distributed.run --standalone --nproc-per-node=2" in attempts(folder, run.id)[0]
    manifest = folder.manifest(run.id)
    assert manifest["status"] == "succeeded" and manifest["config"]["shard"] is True
    assert manifest["model"]["data_parallel"]["world_size"] == 2
    table = pd.read_csv(folder.root / "study.csv")
    assert set(table["selection"]) == {"baseline", "top_k", "random_k", "bottom_k"}


@pytest.mark.slow
def test_a_failed_run_is_reported_and_run_again_only_with_retry_failed(tmp_path, capsys):
    short = tmp_path / "short.json"  # 16-token blocks do not fit an 8-token context
    short.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2,
                                 "n_positions": 8}))
    document = {"name": "fails", "base": {**TINY_RUN, "metric": "magnitude", "topk": 2},
                "grid": {"model": ["random:tiny-llama", f"random:{short}"]}}
    study_file = str(write_study(tmp_path, document))
    out = str(tmp_path / "fails")
    assert study_main(["run", study_file, "--out", out, "--jobs", "2"]) == 1  # both at once
    study = spec.load(study_file)
    spec.validate(study, Path(out))
    good, bad = (run.id for run in study.runs)
    folder = StudyFolder(out)
    assert (folder.state(good), folder.state(bad)) == ("done", "failed")
    assert folder.last_exit(bad) == 2 and "max-length" in folder.log(bad).read_text()
    capsys.readouterr()
    assert study_main(["status", study_file, "--out", out]) == 1
    assert f"{bad}  failed" in capsys.readouterr().out
    assert study_main(["run", study_file, "--out", out]) == 1
    assert len(attempts(folder, bad)) == 1  # a failure is not retried unasked
    assert study_main(["run", study_file, "--out", out, "--retry-failed"]) == 1
    assert len(attempts(folder, bad)) == 2 and len(attempts(folder, good)) == 1
