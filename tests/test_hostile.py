"""A hostile but realistic user: reused and shared output folders, killed runs, broken inputs,
secrets on the command line and in the environment. Each numbered point of the reliability
contract (README "Output folder and run lifecycle") has a case here; tiny random models where
the built-in one is not needed."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.cli import main
from src.errors import UserError
from src.report.run_folder import read_runs
from src.utils import output, signals
from tests.conftest import ROOT, RUNNER

TINY = ["--model", "random:tiny-llama", "--device", "cpu", "--max-length", "32",
        "--max-samples", "4", "--topk", "3", "--mode", "global"]


MANY_SEEDS = ",".join(map(str, range(30)))  # random-K conditions: a run long enough to stop


def run_main(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def strict_json(path: Path):
    """Parse as any strict JSON parser would: no NaN / Infinity tokens."""
    def refuse(token):
        raise ValueError(f"{path.name}: non-standard JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def start_run(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RUNNER), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=_as_a_terminal_starts_it)


def _as_a_terminal_starts_it():
    """Ctrl-C (SIGINT) not ignored in the run, as in a terminal: a background job (a CI script,
    `cmd &`) starts with SIGINT ignored, and Python then keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


# ----------------------------------------------------------------------------- 1. one run per folder

@pytest.fixture(scope="module")
def perturbed_run(tmp_path_factory):
    """A finished --perturb zero run, and a user's own file beside it."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main([*TINY, "--perturb", "zero", "--seeds", "0", "--save-plots", "--out-dir",
                 str(out)]) == 0
    (out / "my_notes.txt").write_text("the user's own file")
    return out


def test_a_folder_holding_a_run_is_refused_untouched(perturbed_run, capsys):
    before = files_of(perturbed_run)
    code, err = run_main(capsys, *TINY, "--out-dir", perturbed_run)  # no --perturb this time
    assert code == 2 and "already holds files" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert files_of(perturbed_run) == before


def test_overwrite_replaces_the_run_and_keeps_other_files(perturbed_run, capsys, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in files_of(perturbed_run).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    assert main([*TINY, "--metric", "magnitude", "--overwrite", "--out-dir", str(copy)]) == 0
    remaining = set(files_of(copy))
    assert "perturbation_results.json" not in remaining and not (copy / "plots").exists()
    assert (copy / "my_notes.txt").read_text() == "the user's own file"
    manifest = json.loads((copy / "experiment_manifest.json").read_text())
    listed = [f["path"] for f in manifest["output_files"]]
    assert sorted(listed) == sorted(set(listed)), "a file listed twice"
    assert set(listed) == remaining - {"my_notes.txt"}
    assert manifest["config"]["metric"] == "magnitude"


# ----------------------------------------------------------------------------- 2. one run at a time

def test_a_folder_held_by_a_live_run_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": os.uname().nodename, "started_at": "earlier"}
        (out / output.LOCK_NAME).write_text(json.dumps(lock))
        code, err = run_main(capsys, *TINY, "--out-dir", out)
        assert code == 2 and f"in use by another run (pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    code, _ = run_main(capsys, *TINY, "--metric", "magnitude", "--out-dir", out)
    assert code == 0 and not (out / output.LOCK_NAME).exists()  # taken over, then released


@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder(tmp_path):
    out = tmp_path / "shared"
    first = start_run(*TINY, "--max-samples", "16", "--perturb", "zero", "--seeds",
                      MANY_SEEDS, "--out-dir", out)
    try:
        wait_for(lambda: (out / output.LOCK_NAME).exists())
        second = subprocess.run([sys.executable, str(RUNNER), *TINY, "--out-dir", str(out)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr
    finally:
        first.terminate()
        first.communicate(timeout=120)


# ----------------------------------------------------------------------------- 3, 4. lifecycle

@pytest.mark.parametrize("signum, code", [
    (signal.SIGTERM, 143), pytest.param(signal.SIGHUP, 129, marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_signal_mid_perturbation_keeps_finished_conditions(tmp_path, signum, code):
    out = tmp_path / "run"
    run = start_run(*TINY, "--max-samples", "16", "--perturb", "zero", "--seeds",
                    MANY_SEEDS, "--out-dir", out)
    results = out / "perturbation_results.json"
    wait_for(results.exists)
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == code, stderr
    assert "weights were restored" in stderr and "finished and are kept in perturbation_results" in stderr
    manifest = strict_json(out / "experiment_manifest.json")
    assert manifest["status"] == "interrupted" and manifest["success"] is False
    assert signal.Signals(signum).name in manifest["error"] or signum == signal.SIGINT
    kept = strict_json(results)
    assert kept["complete"] is False and 1 <= len(kept["conditions"]) < kept["n_conditions"]
    assert all(row["restore_verified"] for row in kept["conditions"])
    assert not (out / output.LOCK_NAME).exists()
    runs, skipped = read_runs([tmp_path])
    assert runs == [] and "interrupted" in skipped[0][1]


@pytest.mark.slow
def test_sigkill_leaves_running_with_a_dead_pid_and_the_report_leaves_it_out(tmp_path):
    out = tmp_path / "killed"
    run = start_run(*TINY, "--max-samples", "16", "--perturb", "zero", "--seeds",
                    MANY_SEEDS, "--out-dir", out)
    wait_for((out / "perturbation_results.json").exists)
    run.kill()
    run.communicate(timeout=60)
    manifest = strict_json(out / "experiment_manifest.json")
    assert manifest["status"] == "running" and manifest["pid"] == run.pid
    runs, skipped = read_runs([tmp_path])
    assert runs == [] and "killed while running" in skipped[0][1]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_research_report.py"),
                           "--input-dirs", str(tmp_path), "--output", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "killed while running" in done.stderr


@pytest.mark.slow
def test_the_manifest_says_running_from_the_start(tmp_path):
    out = tmp_path / "run"
    run = start_run(*TINY, "--max-samples", "16", "--perturb", "zero", "--seeds",
                    MANY_SEEDS, "--out-dir", out)
    try:
        wait_for((out / "experiment_manifest.json").exists)
        manifest = strict_json(out / "experiment_manifest.json")
        assert manifest["status"] == "running" and manifest["pid"] == run.pid
        assert manifest["host"] and manifest["started_at"] and manifest["finished_at"] is None
    finally:
        run.kill()
        run.communicate(timeout=60)


def test_restore_finishes_even_when_a_second_signal_arrives(tiny_llama):
    from src.sensitivity.perturb import fingerprint, perturbed

    params = dict(tiny_llama.model.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    before = fingerprint(params)
    selection = {name: torch.arange(50)}
    with pytest.raises(signals.Interrupted):  # the first signal, once the section is over
        with signals.as_exceptions(), perturbed(params, selection, "zero"):
            with signals.deferred():  # as the restore runs: signals wait for its end
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                assert fingerprint(params) != before  # still perturbed, no signal acted yet
    assert fingerprint(params) == before


def test_deferred_signals_act_in_order_after_the_section():
    finished = []
    with pytest.raises(signals.Interrupted) as stop, signals.as_exceptions():
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            finished.append(True)
    assert finished == [True] and stop.value.exit_code == 143


# ----------------------------------------------------------------------------- 5. output location

@pytest.mark.parametrize("where, message", [
    ("/proc/cwa-results", "cannot be written"),
    ("/proc/self/cwa", "cannot be written"),
    ("FILE/inside", "which is a file, not a folder"),
])
def test_bad_output_location_exits_2_at_once(tmp_path, where, message):
    (tmp_path / "FILE").write_text("x")
    where = where.replace("FILE", str(tmp_path / "FILE"))
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(RUNNER), "--out-dir", where], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert elapsed < 1.5, f"{elapsed:.2f} s: the output folder must be checked before torch loads"


# ----------------------------------------------------------------------------- 6-9. inputs

def _gguf_prefix() -> bytes:
    from src.models.builtin import builtin_gguf_path

    return builtin_gguf_path().read_bytes()[:200_000]


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "lacks config.json"),
    (lambda d: (d.mkdir(), (d / "readme.txt").write_text("hi")), "holds no complete model"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "lacks weights"),
    (lambda d: d.with_suffix(".gguf").write_bytes(b"not a model at all"), "not a GGUF file"),
    (lambda d: d.with_suffix(".gguf").write_bytes(_gguf_prefix()), "truncated or damaged"),
    (lambda d: d.with_suffix(".json").write_text("[1, 2]"), "must be a JSON object"),
    (lambda d: d.with_suffix(".json").write_text('{"model_type": "lama"}'),
     "unknown model_type 'lama'; close matches: llama"),
    (lambda d: d.with_suffix(".json").write_text(
        '{"model_type": "llama", "hidden_size": -8}'), "'hidden_size' must be a positive"),
    (lambda d: d.with_suffix(".json").write_text(
        '{"model_type": "llama", "num_hidden_layers": 0}'), "'num_hidden_layers' must be a"),
])
def test_broken_models_exit_2_with_one_line(tmp_path, capsys, make, message):
    base = tmp_path / "model"
    make(base)
    spec = next(p for p in (base, base.with_suffix(".gguf"), base.with_suffix(".json"))
                if p.exists())
    spec = f"random:{spec}" if spec.suffix == ".json" else str(spec)
    code, err = run_main(capsys, "--model", spec, "--out-dir", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_task_data_that_is_not_utf8(tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    code, err = run_main(capsys, *TINY, "--downstream-tasks", "lambada", "--task-data",
                         f"lambada={bad}", "--out-dir", tmp_path / "out")
    assert code == 2 and "is not UTF-8 text" in err and not (tmp_path / "out").exists()


def test_a_corrupt_cache_in_a_read_only_place_is_reported_before_dequantizing(tmp_path,
                                                                              monkeypatch):
    from src.models import builtin

    folder = builtin.builtin_cache_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / builtin.CACHE_MARKER).write_text('["valid JSON", "of the wrong shape"]')
    assert not builtin._cache_is_valid(folder)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def must_not_run(*args):
        raise AssertionError("dequantized although the cache cannot be written")

    monkeypatch.setattr(builtin.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(builtin, "_build_builtin_cache", must_not_run)
    with pytest.raises(UserError, match="cannot be written .*--cache-dir"):
        builtin.ensure_cache(tmp_path)


@pytest.mark.parametrize("args", [["--dataset", "wikitext:wikitext-2-raw-v1:test"],
                                  ["--downstream-tasks", "lambada", "--task-data", "lambada=hub"]])
def test_offline_hub_data_fails_fast_with_one_line(tmp_path, capsys, monkeypatch, args):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.monotonic()
    code, err = run_main(capsys, *TINY, *args, "--out-dir", tmp_path / "out")
    assert time.monotonic() - start < 5
    assert code == 2 and "offline" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 10. secrets

TOKEN = "hf_" + "Ab3dE" * 7
PASSWORD = "pa55w0rd-Very-Secret"


@pytest.mark.slow
def test_no_secret_reaches_any_output_file(tmp_path, monkeypatch):
    cache = tmp_path / f"cache_{TOKEN}"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("DATABASE_URL", f"postgres://user:{PASSWORD}@db.example/prod")
    monkeypatch.setenv("HF_ENDPOINT_MIRROR", f"https://me:{PASSWORD}@mirror.example")
    monkeypatch.setenv("CWA_NOTE", f"api_key={PASSWORD}")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(sys, "argv", [str(RUNNER), "--cache-dir", str(cache), "--token", TOKEN])
    out = tmp_path / "run"
    assert main([*TINY, "--cache-dir", str(cache), "--perturb", "zero", "--seeds", "0",
                 "--out-dir", str(out)]) == 0
    for name, data in files_of(out).items():
        text = data.decode("utf-8", errors="replace")
        for secret in (TOKEN, PASSWORD):
            assert secret not in text, f"{name} holds a secret"
    manifest = strict_json(out / "experiment_manifest.json")
    variables = manifest["environment"]["variables"]
    assert "DATABASE_URL" not in variables and variables["OMP_NUM_THREADS"] == "2"
    assert variables["HF_TOKEN"] == "<redacted>"
    assert manifest["command"][-1] == "<redacted>" and "<redacted>" in manifest["config"][
        "cache_dir"]


# ----------------------------------------------------------------------------- 11-13. files

def test_every_json_of_an_overflowing_run_is_strict(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--perturb", "gauss_noise", "--perturb-scale", "1e40", "--seeds", "0",
                 "--stability-check", "--stability-batches", "2", "--out-dir", str(out)]) == 0
    results = strict_json(out / "perturbation_results.json")
    assert "inf" in {row["perplexity"] for row in results["conditions"]}
    for path in out.rglob("*.json"):
        strict_json(path)
    from src.utils.io import read_json

    assert read_json(out / "perturbation_results.json")["conditions"][0]["perplexity"] == math.inf


def test_output_files_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main([*TINY, "--metric", "magnitude", "--out-dir", str(out)]) == 0
    finally:
        os.umask(previous)
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path.name


def test_bootstrap_interval_with_some_infinite_blocks():
    from src.eval.perplexity import EvalResult
    from src.sensitivity.experiment import bootstrap_delta_ppl

    tokens = torch.full((20,), 10, dtype=torch.int64)
    base = EvalResult(2.0, math.exp(2.0), 0.5, 200, torch.full((20,), 20.0, dtype=torch.float64),
                      tokens)
    nll = torch.full((20,), 21.0, dtype=torch.float64)
    nll[0] = math.inf  # one block of twenty overflowed
    damaged = EvalResult(math.inf, math.inf, 0.4, 200, nll, tokens)
    low, high = bootstrap_delta_ppl(base, damaged)
    assert math.isfinite(low) and low > 0 and high == math.inf
    from src.utils.io import to_jsonable

    assert to_jsonable([low, high])[1] == "inf"


# ----------------------------------------------------------------------------- issue 25

@pytest.mark.parametrize("seeds, message", [
    ("-1", "--seeds must be at least 0 (got -1)"),
    ("99999999999", "--seeds must be at most 4294967295 (got 99999999999)"),
    ("0,,1", "--seeds '0,,1' has an empty item"),
    ("0,1,", "--seeds '0,1,' has an empty item"),
    ("0,0,1", "--seeds '0,0,1' names 0 twice"),
])
def test_bad_seeds_exit_2_with_one_line(tmp_path, capsys, seeds, message):
    code, err = run_main(capsys, *TINY, "--perturb", "zero", "--seeds", seeds,
                         "--out-dir", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_is_accepted(tmp_path):
    from src.cli import config_from_argv

    config = config_from_argv(["--seeds", "0,4294967295", "--out-dir", str(tmp_path / "o")])
    assert config.seeds == (0, 4294967295)


@pytest.fixture(scope="module")
def scores_on_bundled_data(tmp_path_factory):
    """A run that kept its scores: TINY on the bundled corpus."""
    out = tmp_path_factory.mktemp("scores") / "source"
    assert main([*TINY, "--metric", "grad_x_weight", "--save-scores", "--out-dir",
                 str(out)]) == 0
    return out


def _other_text(tmp_path: Path) -> Path:
    path = tmp_path / "other.txt"
    path.write_text("\n\n".join(f"Paragraph {i} of someone else's notes about rivers, boats "
                                f"and the weather in spring, written down on day {i}."
                                for i in range(40)))
    return path


@pytest.mark.parametrize("change, message", [
    (["--max-samples", "8"], "--max-samples: 4 there, 8 here"),
    (["--max-length", "16"], "--max-length: 32 there, 16 here"),
    (["--data-file", "OTHER"], "the calibration data: bundled:src/data/corpus.txt there, file:"),
])
def test_scores_from_other_data_are_refused_naming_what_differs(
        tmp_path, capsys, scores_on_bundled_data, change, message):
    change = [str(_other_text(tmp_path)) if a == "OTHER" else a for a in change]
    before = files_of(scores_on_bundled_data)
    code, err = run_main(capsys, *TINY, *change, "--scores-from", scores_on_bundled_data,
                         "--out-dir", tmp_path / "out")
    assert code == 2 and message in err and "--scores-from-other-data" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert files_of(scores_on_bundled_data) == before


def test_scores_from_other_data_with_the_flag_are_recorded_and_reported(
        tmp_path, capsys, scores_on_bundled_data):
    from src.report.build import main as report_main

    out = tmp_path / "runs" / "reused"
    code, err = run_main(capsys, *TINY, "--max-samples", "8", "--scores-from",
                         scores_on_bundled_data, "--scores-from-other-data", "--out-dir", out)
    assert code == 0, err
    assert "computed on other calibration data" in err and "--max-samples: 4 there, 8 here" in err
    manifest = strict_json(out / "experiment_manifest.json")
    source = manifest["scores_source"]
    stored = source["calibration"]
    assert stored["source"] == "bundled:src/data/corpus.txt"
    assert (stored["max_length"], stored["max_samples"], stored["blocks"]) == (32, 4, 4)
    assert stored["sha256"] != manifest["data"]["calibration"]["sha256"]
    assert source["same_calibration_as_this_run"] is False
    assert source["differences"] == ["--max-samples: 4 there, 8 here"]
    assert any("other calibration data" in w for w in manifest["warnings"])
    assert report_main(["--input-dirs", str(tmp_path / "runs"), "--output",
                        str(tmp_path / "report"), "--format", "md"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "Scores loaded from" in text and stored["sha256"][:12] in text
    assert "other calibration data than this run" in text and "--max-samples: 4 there, 8 here" \
        in text


def test_resume_scores_again_when_its_data_file_changed(tmp_path, capsys):
    text = _other_text(tmp_path)
    out = tmp_path / "run"
    args = [*TINY, "--data-file", text, "--save-scores", "--out-dir", out]
    assert run_main(capsys, *args)[0] == 0
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    (out / "experiment_manifest.json").write_text(json.dumps({**manifest, "status": "failed"}))
    text.write_text(text.read_text().replace("rivers", "lakes"))
    code = main([str(a) for a in args] + ["--resume"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "the saved scores do not fit (they were computed on other calibration data); " \
           "scoring again" in printed
    assert "scores_source" not in strict_json(out / "experiment_manifest.json")


def test_scores_from_other_data_flag_needs_scores_from(tmp_path, capsys):
    code, err = run_main(capsys, *TINY, "--scores-from-other-data", "--out-dir", tmp_path / "o")
    assert code == 2 and "--scores-from-other-data has no effect without --scores-from" in err


PASSWORD_URL = f"https://bob:{PASSWORD}@data.example/corpus"


@pytest.mark.parametrize("args", [["--dataset", PASSWORD_URL], ["--model", PASSWORD_URL]])
def test_a_password_in_a_url_is_not_echoed(tmp_path, monkeypatch, args):
    done = subprocess.run([sys.executable, str(RUNNER), *args, "--out-dir", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    assert "bob:<redacted>@data.example" in done.stderr


def test_a_bug_s_traceback_is_printed_redacted(tmp_path, capsys, monkeypatch):
    def crash(argv):
        raise RuntimeError(f"could not open {PASSWORD_URL}")

    monkeypatch.setattr("src.cli.config_from_argv", crash)
    code, err = run_main(capsys, "--out-dir", tmp_path / "o")
    assert code == 1 and "Traceback" in err and "RuntimeError: could not open" in err
    assert PASSWORD not in err and "bob:<redacted>@" in err


def test_the_default_out_dir_holds_no_password():
    from src.utils.output import default_out_dir

    assert PASSWORD not in default_out_dir(PASSWORD_URL, "magnitude", 3)


def test_an_out_dir_that_is_a_dangling_symlink_exits_2(tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    for out_dir in (link, link / "run"):
        code, err = run_main(capsys, *TINY, "--out-dir", out_dir)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "is a symbolic link to" in err and "which does not exist" in err
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_report_output_under_a_file_exits_2(tmp_path, perturbed_run):
    (tmp_path / "somefile").write_text("mine")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_research_report.py"),
                           "--input-dirs", str(perturbed_run.parent), "--output",
                           str(tmp_path / "somefile" / "report")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--output" in done.stderr and "somefile' exists and is a file" in done.stderr
    assert (tmp_path / "somefile").read_text() == "mine"


@pytest.mark.parametrize("in_the_way, message", [
    (lambda d: (d / "report_figures").write_text("mine"),
     "(the figures' folder) exists and is a file"),
    (lambda d: (d / "report.md").mkdir(), "report.md' exists and is a folder"),
])
def test_report_files_in_the_way_exit_2(tmp_path, capsys, perturbed_run, in_the_way, message):
    from src.report.build import main as report_main

    in_the_way(tmp_path)
    code = report_main(["--input-dirs", str(perturbed_run.parent), "--output",
                        str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_quant_group_not_dividing_a_row_says_how_the_last_group_is_formed(tmp_path, capsys):
    from src.cli import build_parser

    assert "the last group of a row is shorter" in build_parser().format_help().replace("\n", " ")
    out = tmp_path / "run"
    code = main([*TINY, "--quantize", "4", "--quant-group", "48", "--seeds", "0",
                 "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    groups = strict_json(out / "quantization_results.json")["groups"]
    # tiny-llama rows hold 64 inputs (attention, gate, up) or 128 (down)
    assert groups == [{"row_length": 64, "full_groups": 1, "last_group": 16},
                      {"row_length": 128, "full_groups": 2, "last_group": 32}]
    assert "rows of 64 inputs: 1 group of 48 and a last group of 16" in printed
    assert "rows of 128 inputs: 2 groups of 48 and a last group of 32" in printed


def test_one_giant_line_of_data_says_how_it_was_split_and_warns(tmp_path, capsys):
    text = tmp_path / "giant.txt"
    text.write_text(" ".join(f"word{i} is followed by another" for i in range(40)))
    out = tmp_path / "run"
    code, err = run_main(capsys, *TINY, "--max-samples", "16", "--data-file", text,
                         "--out-dir", out)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("[cwa] warning:")]
    assert len(warnings) == 2, err
    manifest = strict_json(out / "experiment_manifest.json")
    blocks = manifest["data"]["calibration"]["blocks"], manifest["data"]["evaluation"]["blocks"]
    assert max(blocks) < 16
    sides = (f"calibration: 1 document, {blocks[0]} blocks; evaluation: 1 document, "
             f"{blocks[1]} blocks")
    assert "a single document, cut in two" in warnings[0]
    assert sides in warnings[0]
    assert "fewer blocks than --max-samples 16" in warnings[1] and sides in warnings[1]
    assert [f"[cwa] warning: {w}" for w in manifest["warnings"]] == warnings


def test_lopsided_documents_warn_about_the_short_side(tmp_path, capsys):
    text = tmp_path / "lopsided.txt"
    text.write_text(" ".join(f"word{i} is followed by another" for i in range(60)) + "\n" +
                    " ".join(f"item{i} comes next" for i in range(12)) + "\nA short line.\n")
    out = tmp_path / "run"
    code, err = run_main(capsys, *TINY, "--data-file", text, "--out-dir", out)
    assert code == 0, err
    manifest = strict_json(out / "experiment_manifest.json")
    assert manifest["data"]["evaluation"]["blocks"] == 4  # two documents, one of them huge
    assert manifest["data"]["calibration"]["blocks"] == 1
    assert manifest["warnings"] == [
        "the calibration side got fewer blocks than --max-samples 4 asks (calibration: "
        "1 document, 1 block; evaluation: 2 documents, 4 blocks); give more text or lower "
        "--max-samples"]
    assert f"[cwa] warning: {manifest['warnings'][0]}" in err
