"""scripts/generate_research_report.py on real run folders of the built-in model.

Two small runs are made once per module (grad_x_weight with stability and plots, magnitude
without), in two inputs under the same folder name; the report's numbers are checked against the
runs' own JSON/CSV files.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from src.analysis import registry
from src.report import findings
from src.report.cross_run import plot_by_k
from src.report.run_folder import RunFolder, unique_labels
from src.utils.format import pct, times
from tests.conftest import ROOT, run_cli

REPORT = ROOT / "scripts" / "generate_research_report.py"
SMALL = ("--max-length", "32", "--max-samples", "2", "--topk", "5", "--mode", "global",
         "--perturb", "zero", "--seeds", "0,1")


def run_report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("report_runs")
    first, second = base / "in1" / "run", base / "in2" / "run"  # same name, two inputs
    done = run_cli(*SMALL, "--metric", "grad_x_weight", "--stability-check",
                   "--stability-batches", "2", "--save-plots", "--out-dir", first, timeout=1800)
    assert done.returncode == 0, done.stderr
    done = run_cli(*SMALL, "--metric", "magnitude", "--bit-format", "int8", "--fault-injection",
                   "8", "--fault-eval-samples", "1", "--bit-search", "2",
                   "--bit-search-candidates", "2", "--out-dir", second, timeout=1800)
    assert done.returncode == 0, done.stderr
    return base, first, second


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_report_tables_findings_and_plots(runs, tmp_path):
    base, first, second = runs
    done = run_report("--input-dirs", base / "in1", base / "in2", "--output", tmp_path / "r")
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "r.md").read_text()
    # both same-named runs are there, under distinct labels
    assert "| in1/run |" in text and "| in2/run |" in text
    for folder, label in ((first, "in1/run"), (second, "in2/run")):
        results = _json(folder / "perturbation_results.json")
        base_ppl = results["baseline"]["perplexity"]
        top = next(r for r in results["conditions"] if r["selection"] == "top_k")
        randoms = [r["perplexity"] for r in results["conditions"] if r["selection"] == "random_k"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {base_ppl:.2f} |" in row and f"| {top['perplexity']:.2f} |" in row
        mean = sum(randoms) / len(randoms)
        assert f"{mean:.2f} ± " in row and "(n=2)" in row
        # the finding is computed from these numbers
        ratio = top["perplexity"] / base_ppl
        move = max(abs(p / base_ppl - 1) for p in randoms)
        finding = next(line for line in text.splitlines()
                       if line.startswith(f"- `{label}`: Zeroing the top-5"))
        change = times(ratio) if ratio > 1 else pct(1 - ratio)
        assert change in finding and pct(move) in finding
        assert ("raised" if ratio > 1 else "lowered") in finding
        assert f"{base_ppl:.2f} → {top['perplexity']:.2f}" in finding
    jaccard = _json(first / "stability_results.json")["across_seeds"]["jaccard"]["mean"]
    assert f"mean Jaccard {jaccard:.3f}" in text
    # top-K overlap between the two metrics, computed independently from the CSVs
    sets = [set(zip(*pd.read_csv(f / "top_weights.csv")[["parameter", "flat_index"]].T.values))
            for f in (first, second)]
    shared = len(sets[0] & sets[1])
    assert (f"grad_x_weight and magnitude agree on {shared} of 5 top-K weights "
            f"(Jaccard {shared / len(sets[0] | sets[1]):.3f})") in text
    # each run links its own plots; cross-run figures exist
    for plot in (first / "plots").glob("*.png"):
        assert f"]({os.path.relpath(plot, tmp_path)})" in text
    assert "No plots in this run" in text  # the magnitude run had no --save-plots
    faults_check(text, second)
    for name in ("by_model", "by_metric", "by_k", "fault_rates", "bit_search"):
        figure = tmp_path / "r_figures" / f"{name}.png"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"r_figures/{name}.png" in text


def faults_check(text: str, folder) -> None:
    """The hardware-fault files of a run and their rows in the report agree."""
    injected, searched = _json(folder / "fault_injection.json"), _json(folder / "bit_search.json")
    assert injected == _json(folder / "enhanced_analysis.json")["fault_injection"]
    assert len(pd.read_csv(folder / "fault_injection.csv")) == injected["n_injections"] == 8
    assert len(pd.read_csv(folder / "bit_search.csv")) == searched["n_flips"] == 2
    assert injected["restore_verified"] and searched["restore_verified"]
    overall = injected["overall"]
    row = next(line for line in text.splitlines() if line.startswith("| in2/run | ") and
               "rtn8-g128-asymmetric" in line)
    assert f"{100 * overall['rate']:.2f}% [{100 * overall['ci_low']:.2f}%, " \
           f"{100 * overall['ci_high']:.2f}%] of 8" in row
    assert "Fault injection: critical rate per bit position" in text
    assert "Bit search: flips committed" in text


@pytest.mark.slow
def test_html_is_self_contained(runs, tmp_path):
    base, first, _ = runs
    done = run_report("--input-dirs", base, "--output", tmp_path / "r", "--format", "html")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "r.md").exists()
    page = (tmp_path / "r.html").read_text()
    images = re.findall(r"<img [^>]*src='([^']*)'", page)
    n_run_plots = len(list((first / "plots").glob("*.png")))
    assert n_run_plots >= 4 and len(images) == 5 + n_run_plots
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def copy_run(source, destination, changes=None):
    """A copy of a run folder with some files replaced (text) or removed (None)."""
    shutil.copytree(source, destination)
    for name, text in (changes or {}).items():
        if text is None:
            (destination / name).unlink()
        else:
            (destination / name).write_text(text)


@pytest.mark.slow
def test_broken_json_is_reported_and_skipped(runs, tmp_path):
    base, first, _ = runs
    inputs = tmp_path / "inputs"
    copy_run(first, inputs / "broken_run", {"stability_results.json": '{"k": 5, "across_seeds": '})
    copy_run(first, inputs / "good_run")
    copy_run(first, inputs / "no_perturb", {"perturbation_results.json": None})  # no --perturb
    done = run_report("--input-dirs", tmp_path / "inputs", "--output", tmp_path / "r",
                      "--format", "md")
    assert done.returncode == 0, done.stderr
    assert "broken_run" in done.stderr and "stability_results.json is not valid JSON" in done.stderr
    text = (tmp_path / "r.md").read_text()
    assert "| good_run |" in text and "| broken_run |" not in text
    row = next(line for line in text.splitlines() if line.startswith("| no_perturb |"))
    assert "| — | — | — |" in row and "Top-5 sets are" in text
    left_out = text.split("## Folders left out", 1)[1]
    assert "broken_run" in left_out and "not valid JSON (line 1" in left_out


@pytest.mark.slow
def test_no_readable_run_exits_2(runs, tmp_path):
    base, _, second = runs
    copy_run(second, tmp_path / "only" / "run", {"config.json": "{not json"})
    done = run_report("--input-dirs", tmp_path / "only", "--output", tmp_path / "r")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: no readable finished runs")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_report("--input-dirs", empty, "--output", tmp_path / "r")
    assert done.returncode == 2 and "no run folders" in done.stderr
    done = run_report("--input-dirs", empty, "--output", tmp_path / "r", "--format", "pdf")
    assert done.returncode == 2 and "bad --format" in done.stderr


def test_unique_labels_never_collide(tmp_path):
    a, b, c = tmp_path / "x" / "results", tmp_path / "y" / "results", tmp_path / "z"
    pairs = [(a, a / "run"), (b, b / "run"), (c, c / "run"), (c, c / "other")]
    labels = unique_labels(pairs)
    assert len(set(labels)) == 4
    assert labels == ["input1/results/run", "input2/results/run", "z/run", "other"]


def test_significance_sentence_states_the_attainable_p():
    summary = {"top_vs_random": {"n_random_draws": 2, "empirical_p_value": 1 / 3,
                                 "effect_ratio": 1234.0}}
    lines = findings.significance(summary, {"delta_perplexity_ci95": [1.0, 2.0]})
    assert "excludes zero" in lines[0]
    assert "more damaging than 2 of 2" in lines[1] and "at least 19 seeds" in lines[1]
    summary["top_vs_random"].update(n_random_draws=20, empirical_p_value=1 / 21)
    lines = findings.significance(summary, {"delta_perplexity_ci95": [-1.0, 2.0]})
    assert "includes zero" in lines[0] and "significant at the 5% level" in lines[1]
    assert math.isclose(1 / 21, summary["top_vs_random"]["empirical_p_value"])



def test_destructive_random_control_is_called_out():
    assert findings.destructive_control([1.0001, 0.9999]) == []
    assert findings.destructive_control([]) == []
    line, = findings.destructive_control([1115.0, 1117.0, 1116.0])
    assert "random-K control is itself destructive (perplexity 1.12e+03x on average over 3" in line


def _summary(top: float, random: float) -> dict:
    return {"top_k": {"mean_perplexity": top}, "random_k": {"mean_perplexity": random}}


def test_progressive_finding_names_where_damage_falls():
    section = {"method": "zero", "mode": "global", "baseline": {"perplexity": 10.0},
               "curve": {"k": [1, 10, 100], "top_k_perplexity": [20.0, 1000.0, 500.0],
                         "random_k_mean_perplexity": [10.0, 10.01, 10.02]}}
    first, second = registry.load()["progressive_perturbation"].findings(section)
    assert "2x at K=1, 100x at K=10, 50x at K=100" in first and "within 0.20%" in first
    assert second.startswith("Damage is not monotone in K") and "K=10 → 100" in second
    assert "peak is at K=10 (100x)" in second
    section["curve"]["top_k_perplexity"] = [20.0, 1000.0, 5000.0]
    assert len(registry.load()["progressive_perturbation"].findings(section)) == 1


def test_group_findings_rank_groups_by_damage():
    section = {"baseline": {"perplexity": 10.0}, "groups": {
        "attn_k": {"n_tensors": 2, "k": 5, "summary": _summary(30.0, 10.0)},
        "mlp_down": {"n_tensors": 2, "k": 5, "summary": _summary(5000.0, 10.0)}}}
    line, = registry.load()["targeted_perturbation"].findings(section)
    assert line.index("target mlp_down") < line.index("target attn_k")
    assert "top-5 500x, random-K 1.0000x" in line and "top-5 3x" in line
    section["groups"]["attn_k"]["components"] = {"attn_k": 3, "attn_q": 2}
    section["groups"]["mlp_down"]["components"] = {"mlp_down": 1, "mlp_up": 1, "attn_o": 1}
    line, = registry.load()["targeted_perturbation"].findings(section)
    assert "target attn_k (2 tensors: attn_k 3, attn_q 2): top-5" in line
    assert "target mlp_down (2 tensors: mlp_down 1, mlp_up 1…): top-5" in line


def test_by_k_plot_draws_overflow_at_the_top_and_labels_it(tmp_path):
    import matplotlib.pyplot as plt

    def run(k, top):
        conditions = [{"selection": "top_k", "perplexity": top},
                      {"selection": "random_k", "perplexity": 10.0}]
        return RunFolder(tmp_path, {"model": "m", "metric": "g", "mode": "global",
                                    "perturb": "bit_flip", "topk": k}, label=f"k{k}",
                         perturbation={"baseline": {"perplexity": 10.0},
                                       "conditions": conditions})

    figure = plot_by_k([run(1, 100.0), run(10, math.inf)])
    ax = figure.axes[0]
    top_line = ax.get_lines()[0]
    assert list(top_line.get_xdata()) == [1, 10]
    assert list(top_line.get_ydata()) == [10.0, 30.0]  # inf at 3x the largest finite ratio
    assert [t.get_text() for t in ax.texts] == ["inf"]
    plt.close(figure)


def test_depth_trend_needs_significance():
    section = {"metric": "m", "depth": {"peak_mean_score_layer": 3,
                                        "spearman_layer_vs_mean_score": {"rho": -0.3,
                                                                         "p_value": 0.25}}}
    assert registry.load()["architecture"].findings(section)[0].startswith("No significant depth trend")
    section["depth"]["spearman_layer_vs_mean_score"]["p_value"] = 0.01
    assert registry.load()["architecture"].findings(section)[0].startswith("Mean m score falls with depth")

# ----------------------------------------------------------------------------- the suite script

SUITE = ROOT / "scripts" / "run_research_tests.sh"


def run_suite(phase: str, tmp_path, python: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CWA_PYTHON": python, "CWA_RESULTS_DIR": str(tmp_path), **env}
    return subprocess.run(["bash", str(SUITE), phase], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200, env=environment)


@pytest.mark.slow
def test_suite_fails_when_its_runs_fail_and_when_a_study_is_refused(tmp_path):
    short = tmp_path / "short_context.json"  # the phases' 64-token blocks do not fit its context
    short.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1,
                                 "n_head": 2, "n_positions": 32}))
    done = run_suite("hutchinson", tmp_path, sys.executable, CWA_MODEL=f"random:{short}",
                     CWA_SUITE_NAME="short")
    assert done.returncode == 1, done.stdout[-3000:]
    assert "summary: 0 passed, 2 failed, 0 skipped" in done.stdout
    assert "--- FAIL [hutchinson] 0 done, 2 not done" in done.stdout
    logs = list((tmp_path / "short" / "hutchinson" / "runs").glob("*.log"))
    assert len(logs) == 2 and all("max-length" in p.read_text() for p in logs)
    refused = run_suite("mediation", tmp_path, sys.executable, CWA_MAX_SAMPLES="0",
                        CWA_SUITE_NAME="refused")
    assert refused.returncode == 1
    assert "--max-samples must be at least 1" in refused.stdout
    assert "summary: 0 passed, 1 failed, 0 skipped" in refused.stdout


SUITE_SETTINGS = ["model=smollm2-135m", "device=auto", "max-samples=4"]
# phase -> (runs, runs that read the scores another run of the phase computed)
SUITE_PHASES = {"validation": (3, 1), "perturbation": (6, 5), "multi-metric": (5, 0),
                "faithfulness": (1, 0), "faults": (2, 1), "mediation": (1, 0),
                "hutchinson": (2, 0), "downstream": (1, 0), "compression": (4, 2)}


def test_every_bundled_study_of_the_suite_validates(tmp_path):
    from src.study import execute, spec

    script = SUITE.read_text()
    phases = re.search(r'^PHASES="([^"]+)"', script, re.M).group(1).split()
    assert sorted(SUITE_PHASES) == sorted(set(phases) - {"llama", "mistral"})
    for phase, (n_runs, n_reading) in SUITE_PHASES.items():
        study = spec.load(str(ROOT / "scripts" / "studies" / f"{phase}.yaml"), SUITE_SETTINGS)
        spec.validate(study, tmp_path / phase)  # the real parser and validation of every run
        assert len(study.runs) == n_runs, phase
        assert sum(len(wave) for wave in execute.waves(study.runs)[1:]) == n_reading, phase
    hub = spec.load(str(ROOT / "scripts" / "studies" / "hub-model.yaml"),
                    ["model=random:tiny-llama", "device=cpu"])
    spec.validate(hub, tmp_path / "hub")
    assert [run.config.model for run in hub.runs] == ["random:tiny-llama"]


@pytest.mark.slow
def test_suite_skips_hub_models_it_cannot_load(tmp_path):
    done = run_suite("llama", tmp_path, sys.executable, HF_HUB_OFFLINE="1",
                     LLAMA_MODEL="nobody-has-this/model-xyz")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SKIP [llama] nobody-has-this/model-xyz: cannot be loaded here" in done.stdout
    assert "summary: 0 passed, 0 failed, 1 skipped" in done.stdout


def test_suite_rejects_unknown_phase(tmp_path):
    done = run_suite("everything", tmp_path, sys.executable)
    assert done.returncode == 2 and "unknown phase 'everything'" in done.stderr


def test_a_condition_that_changed_nothing_is_flagged_not_read_as_an_effect():
    conditions = [{"selection": "top_k", "seed": None, "vacuous": False},
                  {"selection": "bottom_k", "seed": None, "vacuous": True},
                  {"selection": "random_k", "seed": 3, "vacuous": True}]
    (line,) = findings.vacuous_conditions(conditions)
    assert line.startswith("WARNING: bottom_k, random_k (seed 3) changed no weight's value")
    assert findings.vacuous_conditions([{"selection": "top_k", "seed": None}]) == []
