"""Plots: numbers behind them checked against independent computations, and a real --save-plots
run of the built-in model (per_tensor mode, png + pdf)."""
from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from src.analysis import registry
from src.cli import config_from_argv
from src.errors import UserError
from src.models.components import ParamMeta
from src.report.run_folder import RunFolder
from src.plots import style
from src.report import experiment_plots, plotting, run_plots  # noqa: F401 - register plots
from tests.conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {**plotting.RUN_PLOTS, **registry.plots()}
CORE_PLOTS = ("sensitivity_distribution", "layer_component_heatmap", "topk_location",
              "perturbation_effects")
ANALYSIS_PLOTS = ("architecture_depth", "progressive_curve", "super_weight_spikes")


def _metas(shapes: dict[str, tuple]) -> dict[str, ParamMeta]:
    from src.models.components import component_of, layer_index

    return {n: ParamMeta(n, layer_index(n), component_of(n), s, False) for n, s in shapes.items()}


def test_log_histograms_match_numpy_octaves():
    generator = torch.Generator().manual_seed(0)
    scores = {"model.layers.0.mlp.down_proj.weight": torch.randn(64, 32, generator=generator)
              * 10 ** torch.randint(-12, 3, (64, 32), generator=generator).float(),
              "model.layers.1.mlp.down_proj.weight": torch.rand(16, 8, generator=generator),
              "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=generator)}
    scores["model.layers.1.mlp.down_proj.weight"][0, :3] = 0.0
    scores["model.layers.0.self_attn.q_proj.weight"][1, 1] = math.inf
    hists = run_plots.log_histograms(run_plots.summarize(scores), _metas({n: tuple(s.shape) for n, s in scores.items()}))
    for component, names in (("mlp_down", ["model.layers.0.mlp.down_proj.weight",
                                           "model.layers.1.mlp.down_proj.weight"]),
                             ("attn_q", ["model.layers.0.self_attn.q_proj.weight"])):
        values = np.abs(np.concatenate([scores[n].numpy().ravel() for n in names]))
        finite = values[np.isfinite(values) & (values > 0)]
        octaves = np.floor(np.log2(finite)).astype(int)  # bin: 2**e <= |s| < 2**(e+1)
        expected = np.bincount(octaves - int(hists.log2_edges[0]),
                               minlength=len(hists.log2_edges) - 1)
        np.testing.assert_array_equal(hists.counts[component], expected)
        assert hists.zeros[component] == int((values == 0).sum())
        assert hists.nonfinite[component] == int((~np.isfinite(values)).sum())
        assert hists.numel[component] == values.size
    assert hists.edges[0] <= min(np.abs(s[s != 0]).min() for s in
                                 (t.numpy() for t in scores.values()))


def test_mean_abs_by_cell_weights_by_numel():
    scores = {"model.layers.0.mlp.up_proj.weight": torch.full((4, 4), -2.0),
              "model.layers.0.mlp.gate_proj.weight": torch.ones(2, 2),
              "model.layers.3.mlp.up_proj.weight": torch.tensor([[1.0, -3.0]])}
    metas = _metas({n: tuple(s.shape) for n, s in scores.items()})
    cells = run_plots.mean_abs_by_cell(run_plots.summarize(scores), metas)
    assert cells[(0, "mlp_up")] == (2.0, 16)
    assert cells[(0, "mlp_gate")] == (1.0, 4)
    assert cells[(3, "mlp_up")] == (2.0, 2)


def test_plot_formats_parse_and_figures_are_closed(tmp_path):
    config = config_from_argv(["--save-plots", "--plot-format", "png, PDF,png"])
    assert config.plot_formats == ("png", "pdf")
    for bad in ("jpg", "", "png,gif"):
        with pytest.raises(UserError):
            config_from_argv(["--save-plots", "--plot-format", bad])
    figure, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    paths = style.save_figure(figure, tmp_path / "sub" / "line", ("png", "svg"))
    assert [p.rsplit(".", 1)[1] for p in paths] == ["png", "svg"]
    assert not plt.fignum_exists(figure.number)


def test_missing_inputs_are_skipped_with_a_note(tmp_path, capsys):
    run = RunFolder(tmp_path, {"metric": "magnitude", "mode": "global", "topk": 3})
    written = plotting.save_run_plots(run, ALL_PLOTS, ("png",))
    assert written == []
    out = capsys.readouterr().out
    assert "perturbation_effects (no perturbation_results.json; needs --perturb)" in out
    assert "stability (no stability_results.json; needs --stability-check)" in out
    assert "plot sensitivity_distribution skipped" in out


@pytest.fixture(scope="module")
def plotted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "run"
    done = run_cli("--max-length", "32", "--max-samples", "2", "--topk", "3", "--mode",
                   "per_tensor", "--layers", "0-3", "--perturb", "sign_flip", "--seeds", "0,1",
                   "--architecture-analysis", "--advanced-perturbations", "progressive",
                   "--progressive-k", "1,3", "--super-weights", "--super-weight-max", "1",
                   "--save-plots", "--plot-format", "png,pdf", "--out-dir", out, timeout=1800)
    assert done.returncode == 0, done.stderr
    return out, done.stdout


@pytest.mark.slow
def test_save_plots_run_writes_non_empty_png_and_pdf(plotted_run):
    out, stdout = plotted_run
    for name in CORE_PLOTS + ANALYSIS_PLOTS:  # the analyses' real output drawn
        png, pdf = out / "plots" / f"{name}.png", out / "plots" / f"{name}.pdf"
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1_000
    assert "stability (no stability_results.json; needs --stability-check)" in stdout
    assert "temporal_drift (no 'temporal_stability' analysis" in stdout
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    listed = {f["path"] for f in manifest["output_files"]}
    assert {f"plots/{name}.png" for name in CORE_PLOTS} <= listed
    assert "plots" in manifest["timings_seconds"]


def test_plot_format_without_save_plots_is_an_error(tmp_path, capsys):
    from src.cli import main

    assert main(["--plot-format", "pdf", "--out-dir", str(tmp_path / "x")]) == 2
    assert "--plot-format has no effect without --save-plots" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_plot_that_cannot_read_its_input_does_not_stop_the_others(tmp_path, capsys):
    from src.utils.io import write_json

    write_json(tmp_path / "enhanced_analysis.json", {"architecture": {"by_layer": "unexpected"},
                                                     "temporal_stability": {"drift": {}}})
    write_json(tmp_path / "config.json", {"metric": "magnitude", "mode": "global", "topk": 3})
    written = plotting.save_run_plots(RunFolder.read(tmp_path), ALL_PLOTS, ("png",))
    out = capsys.readouterr().out
    assert "plot architecture_depth FAILED, results unaffected: AttributeError" in out
    assert "plot temporal_drift skipped: the temporal-stability analysis has fewer" in out
    assert written == [] and plt.get_fignums() == []


def test_cluster_plot_names_noise_and_undefined_silhouette(tmp_path):
    names = [f"model.layers.{layer}.mlp.down_proj.weight" for layer in range(3)]
    profiles = {n: {"layer": i, "component": "mlp_down", "top_share_1pct": 0.1 * (i + 1)}
                for i, n in enumerate(names)}
    clustering = {"method": "dbscan", "silhouette": None,
                  "labels": dict(zip(names, [0, -1, 0]))}
    run = RunFolder(tmp_path, {}, enhanced={
        "weight_analysis": {"profiles": profiles, "clustering": clustering}})
    figure = ALL_PLOTS["weight_clusters"](run)
    left, _, _, bar = figure.axes  # the tail heatmap and its colour bar are drawn first
    assert left.get_title() == ("Tensors clustered by sensitivity profile (dbscan, "
                                "silhouette undefined)")
    assert [t.get_text() for t in bar.get_yticklabels()] == ["noise", "0"]
    plt.close(figure)
