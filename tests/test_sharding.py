"""--shard: FSDP2 sharding under torchrun (gloo, 2 ranks, tiny presets on the CPU).

A sharded run must pick the weights one process picks (same top_weights.csv rows, scores equal to
1e-5 relative) and give the same perturbation results, with every weight restored on both ranks
and rank 1 writing nothing; the pieces (batch padding, row ranges, merged moments, the union of
per-rank candidates) are checked against direct computations."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from src.cli import config_from_argv
from src.errors import UserError
from src.distributed import ranks, sharding
from src.sensitivity.rank import (_candidates, _in_rank_order, _merge_global, _union_over_ranks,
                                  top_k)
from tests.conftest import run_cli
from tests.test_distributed import assert_ok, free_port, torchrun
from tests.test_harness import BUNDLED
from tests.tolerance import (assert_histograms_close, assert_perplexity_close,
                             assert_same_selection, assert_scores_close, assert_stats_close)

RUN = ["--device", "cpu", "--max-length", "32", "--max-samples", "5", "--batch-size", "2",
       "--topk", "5", "--seeds", "0,1", "--controls", "random_k,bottom_k"]
CALIBRATION_TOKENS = 5 * 32  # terms summed into each score of a RUN (tests/tolerance.py)
SELECTION = ["rank", "parameter", "layer", "component", "row", "col", "flat_index", "value"]
STABILITY = ("--stability-check", "--stability-batches", "2")
QUANT = ("--quantize", "3", "--quant-group", "16")  # round-to-nearest with kept sets
TASKS = ("--downstream-tasks", "hellaswag,lambada", "--task-samples", "4", "--lm-eval-tasks",
         "cwa_hellaswag,cwa_lambada", "--lm-eval-include", BUNDLED, "--lm-eval-limit", "4")
GPT2_EXTRA = (*QUANT, "--save-scores", "--architecture-analysis", "--weight-analysis",
              "--n-clusters", "3", "--save-plots")
CASES = [  # model, metric, mode, perturbation, extra: every shardable metric (the data-driven
    # ones on both layer kinds: Linear rows are outputs, GPT-2's Conv1D rows inputs), both modes.
    # Two runs also quantize, one keeps its scores, one evaluates downstream tasks, and the
    # tiny-gpt2 global one runs the analyses and plots: the compression, scores-file, resume,
    # downstream and analyses tests below assert on the same pairs of runs (launched once per
    # module by `pair`)
    ("tiny-llama", "grad_x_weight", "per_tensor", "sign_flip", (*STABILITY, *QUANT)),
    ("tiny-gpt2", "grad_x_weight", "global", "zero", GPT2_EXTRA),
    ("tiny-llama", "act_mag", "global", "zero", (*STABILITY, *TASKS)),
    ("tiny-gpt2", "act_mag", "per_tensor", "sign_flip", ()),
    ("tiny-gpt2", "magnitude", "global", "gauss_noise", ()),
    ("tiny-llama", "random", "global", "bit_flip", ()),
    ("tiny-llama", "grad_squared", "global", "zero", ("--save-scores",)),
    ("tiny-gpt2", "grad_squared", "per_tensor", "sign_flip", STABILITY),  # Conv1D: rows are inputs
]
GPT2_CASE = CASES[1]
RESUME_CASE = CASES[6]
TASKS_CASE = CASES[2]


def case_args(model, metric, mode, method, extra) -> list:
    return [*RUN, "--model", f"random:{model}", "--metric", metric, "--mode", mode,
            "--perturb", method, *extra]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(*args): (one process's folder, the same run's folder under torchrun --shard on 2
    processes), each launched once per module and shared by the tests that assert on it (they
    read the folders and write nothing there)."""
    made = {}

    def get(*args) -> tuple:
        key = tuple(map(str, args))
        if key not in made:
            base = tmp_path_factory.mktemp("pair")
            one, two = base / "one", base / "two"
            assert_ok(run_cli(*args, "--out-dir", one))
            assert_ok(torchrun(*args, "--shard", "--out-dir", two))
            made[key] = one, two
        return made[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model, metric, mode, method, extra", CASES)
def test_sharded_run_equals_one_process(pair, model, metric, mode, method, extra):
    one, two = pair(*case_args(model, metric, mode, method, extra))
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    top_one, top_two = pd.read_csv(one / "top_weights.csv"), pd.read_csv(two / "top_weights.csv")
    assert_same_selection(top_two, top_one, CALIBRATION_TOKENS, per_tensor=mode == "per_tensor")
    rows_one = json.loads((one / "perturbation_results.json").read_text())["conditions"]
    rows_two = json.loads((two / "perturbation_results.json").read_text())["conditions"]
    assert [(r["selection"], r["seed"], r["n_weights"]) for r in rows_two] == \
        [(r["selection"], r["seed"], r["n_weights"]) for r in rows_one]
    for a, b in zip(rows_one, rows_two):
        assert_perplexity_close(b["perplexity"], a["perplexity"])
        assert a["restore_verified"] and b["restore_verified"]
    assert_stats_close(read(two, "sensitivity_stats.json")["parameters"],
                       read(one, "sensitivity_stats.json")["parameters"], CALIBRATION_TOKENS)
    manifest = json.loads((two / "experiment_manifest.json").read_text())
    record = manifest["sharding"]
    assert manifest["status"] == "succeeded" and record["world_size"] == 2
    assert record["parameter_bytes_held_by_rank_0"] <= 0.55 * record["parameter_bytes_total"]
    assert "score_" + metric in manifest["timings_seconds"]
    if STABILITY[0] in extra:  # every subset rescored on the shards, its top-K merged
        assert_close_tree(json.loads((two / "stability_results.json").read_text()),
                          json.loads((one / "stability_results.json").read_text()))


def test_shard_refuses_what_does_not_run_sharded(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UserError, match="needs several processes"):
        ranks.join("cpu", shard=True)  # not launched by torchrun
    ranks.leave()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # no folder checks: rank 0 alone writes the folder
    for extra, flag in ((["--metric", "hutchinson_diag", "--hutchinson-hvp", "double_backward"],
                         "by double backward does not run under --shard"),
                        (["--compare-metrics", "grad_x_weight,hutchinson_diag",
                          "--hutchinson-hvp", "double_backward"],
                         "--hutchinson-hvp double_backward: a Hessian-vector product"),
                        (["--device-map", "auto"], "--device-map cannot be combined"),
                        (["--fault-injection", "10"], "--fault-injection and --bit-search do "
                                                      "not run under --shard yet")):
        with pytest.raises(UserError, match="under --shard|torchrun") as error:
            config_from_argv(["--shard", "--device", "cpu", *extra])
        assert flag in str(error.value)
    config_from_argv(["--shard", "--device", "cpu", "--metric", "act_mag", "--perturb", "zero"])
    config_from_argv(["--shard", "--device", "cpu", "--metric", "hutchinson_diag"])  # auto
    config_from_argv(["--shard", "--device", "cpu", "--compare-metrics", "grad_x_weight,"
                      "hutchinson_diag", "--hutchinson-hvp", "finite_difference"])


def test_padded_batches_and_row_ranges():
    first, second = (ranks.Ranks(rank, 2, sharded=True) for rank in (0, 1))
    assert first.my_batches(5) == [0, 2, 4] and second.my_batches(5) == [1, 3, None]
    assert second.my_batches(5, split=False) == [0, 1, 2, 3, 4]
    replicas = ranks.Ranks(1, 2)  # data parallel: no padding passes (no FSDP to keep in step)
    assert replicas.my_batches(5) == [1, 3] and replicas.gradient_factor == 1.0
    assert second.gradient_factor == 2.0 and ranks.Ranks().my_batches(3) == [0, 1, 2]
    weight = torch.empty(5, 3)
    assert sharding.row_range(weight, 0, 2) == range(0, 3)
    assert sharding.row_range(weight, 1, 2) == range(3, 5)
    assert len(sharding.row_range(torch.empty(1, 3), 1, 2)) == 0  # a rank may hold no rows
    assert [len(sharding.row_range(torch.empty(10, 1), r, 4)) for r in range(4)] == \
        [len(piece) for piece in torch.arange(10).chunk(4)]


def test_sharded_statistics_formulas_equal_one_process_ties_included():
    """The sharded path's formulas (two-pass moments, top shares by bisection on the float bits)
    on one rank holding everything: the single-process statistics."""
    from src.sensitivity.statistics import tensor_statistics

    generator = torch.Generator().manual_seed(0)
    tensors = {"heavy": torch.randn(300, 7, generator=generator).pow(3),
               "ties": torch.tensor([[5.0, 5.0, 5.0, 1.0], [5.0, 2.0, 0.0, 0.0]]),
               "constant": torch.full((3, 3), 0.5), "one": torch.tensor([[-2.0]])}
    # one process: every reduction leaves its tensors as they are
    layout = sharding.Layout(ranks.Ranks(), {n: t.numel() for n, t in tensors.items()},
                             {n: 0 for n in tensors})
    expected = tensor_statistics(tensors, absolute=True, tail=True)
    got = tensor_statistics(tensors, absolute=True, tail=True, layout=layout)
    for name in tensors:
        assert got[name].keys() == expected[name].keys()
        for key, value in expected[name].items():
            assert got[name][key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), \
                (name, key)
    assert got["ties"]["top_share_1pct"] == pytest.approx(5.0 / 23.0)  # one of the four 5s


class _Ranks:
    """all_gather_objects of several ranks run one after another in one process."""

    def __init__(self, per_rank):
        self.per_rank = per_rank

    def all_gather_objects(self, _):
        return self.per_rank


@pytest.mark.parametrize("mode", ["global", "per_tensor"])
def test_union_of_rank_candidates_is_the_single_process_selection_ties_included(mode):
    generator = torch.Generator().manual_seed(0)
    scores = {"a": torch.randint(0, 4, (7, 3), generator=generator).float(),  # many ties
              "b": torch.randint(0, 4, (5, 2), generator=generator).float()}
    k = 6
    expected = top_k(scores, k, mode)
    pieces = [{n: s[sharding.row_range(s, r, 2).start:sharding.row_range(s, r, 2).stop]
               for n, s in scores.items()} for r in range(2)]
    offsets = [{n: sharding.row_range(s, r, 2).start * s.shape[1] for n, s in scores.items()}
               for r in range(2)]
    candidates = [{n: (i.cpu() + offsets[r][n], keys) for n, (i, keys) in
                   _candidates(pieces[r], k, largest=True).items()} for r in range(2)]
    layout = SimpleNamespace(offset={n: 0 for n in scores}, ranks=_Ranks(candidates),
                             numel={n: s.numel() for n, s in scores.items()})
    merged = _union_over_ranks(candidates[0], layout, k)
    got = {n: _in_rank_order(i, keys) for n, (i, keys) in merged.items()} \
        if mode == "per_tensor" else _merge_global(scores, merged, k)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_random_weights_drawn_by_rows_equal_the_whole_draw():
    from src.models import random_init

    def drawn(name: str, rows: range) -> torch.Tensor:
        pieces = list(random_init._row_pieces(name, shape, rows, 0.02, torch.device("cpu")))
        assert [first for first, _ in pieces][0] == rows.start
        return torch.cat([values for _, values in pieces])

    shape = (700, 3)
    whole = drawn("w", range(0, 700))
    assert whole.shape == shape
    for rows in (range(0, 350), range(350, 700), range(255, 257), range(699, 700)):
        assert torch.equal(drawn("w", rows), whole[rows.start:rows.stop])
    assert whole.std().item() == pytest.approx(0.02, rel=0.05)
    assert not torch.equal(drawn("v", range(0, 700)), whole)


def test_random_presets_follow_the_initialisation_rule():
    from tests.conftest import load

    for preset in ("tiny-llama", "tiny-gpt2"):
        model = load(f"random:{preset}").model
        for name, param in model.named_parameters():
            if param.ndim == 1:
                assert torch.all(param == (0.0 if name.endswith("bias") else 1.0)), name
        std = 0.02 / math.sqrt(2 * 2) if preset == "tiny-gpt2" else 0.02
        projection = dict(model.named_parameters())[
            "transformer.h.0.attn.c_proj.weight" if preset == "tiny-gpt2"
            else "model.layers.0.self_attn.o_proj.weight"]
        assert projection.std().item() == pytest.approx(std, rel=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if QUANT[0] in c[4]], ids=lambda c: c[0])
def test_sharded_compression_equals_one_process(pair, case):
    """--quantize 3 --quant-group 16 (the tiny-llama and tiny-gpt2 cases above)."""
    one, two = pair(*case_args(*case))
    rows_one = json.loads((one / "quantization_results.json").read_text())["conditions"]
    rows_two = json.loads((two / "quantization_results.json").read_text())["conditions"]
    assert [r["condition"] for r in rows_two] == [r["condition"] for r in rows_one]
    for a, b in zip(rows_one, rows_two):
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
        assert b["restore_verified"]


@pytest.mark.slow
def test_sharded_quantization_refuses_groups_split_between_processes(tmp_path):
    proc = torchrun(*RUN, "--model", "random:tiny-gpt2", "--metric", "magnitude",
                    "--quantize", "3", "--quant-group", "24", "--shard", "--out-dir",
                    tmp_path / "run")
    assert proc.returncode != 0 and "split a quantization group" in proc.stderr
    assert not re.search(r'File ".*/src/', proc.stderr)  # only torchrun's own report traces
    assert not (tmp_path / "run").exists()


def assert_close_tree(got, expected, path="section"):
    """Equal structure; numbers equal to 1e-5 relative (sums over ranks add in another order);
    wall-clock ``seconds`` aside."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), path
        for key in expected.keys() - {"seconds"}:
            assert_close_tree(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_close_tree(a, b, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-12, nan_ok=True), path
    else:
        assert got == expected, path


def sharded_and_single(tmp_path, *args) -> tuple:
    """(one process's folder, the same run's folder under torchrun --shard on 2 processes)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_cli(*args, "--out-dir", one))
    assert_ok(torchrun(*args, "--shard", "--out-dir", two))
    return one, two


def read(folder, name: str):
    return json.loads((folder / name).read_text())


@pytest.mark.slow
def test_sharded_gpt2_analyses_and_plots_equal_one_process(pair):
    """GPT-2's Conv1D weights (ranks hold input rows): the architecture analysis splits the
    fused c_attn into q/k/v; the weight analysis' profiles, clusters and hotspots; the plots
    (rank 0 draws; the score histogram is the ranks' counts added: the same picture). On the
    tiny-gpt2 global case's runs."""
    one, two = pair(*case_args(*GPT2_CASE))
    sections_one = read(one, "enhanced_analysis.json")
    assert sections_one["architecture"]["fused_qkv"]
    assert "attn_q" in sections_one["architecture"]["by_component"]
    assert_close_tree(read(two, "enhanced_analysis.json"), sections_one)
    drawn = sorted(p.name for p in (one / "plots").iterdir())
    assert {"sensitivity_distribution.png", "layer_component_heatmap.png",
            "architecture_depth.png", "weight_clusters.png"} <= set(drawn)
    assert sorted(p.name for p in (two / "plots").iterdir()) == drawn
    assert_histograms_close(load_scores(two), load_scores(one), CALIBRATION_TOKENS)


def load_scores(folder) -> dict:
    from safetensors.torch import load_file

    from src.sensitivity import score_store

    return load_file(folder / score_store.FILE_NAME)


@pytest.mark.slow
def test_sharded_neox_analyses_equal_one_process(tmp_path):
    """GPT-NeoX's fused query_key_value (ranks hold output rows) in the architecture analysis;
    metric correlation, temporal stability, targeting and the three advanced perturbations."""
    one, two = sharded_and_single(
        tmp_path, *RUN, "--model", "random:tiny-neox", "--metric", "grad_x_weight", "--mode",
        "global", "--architecture-analysis", "--compare-metrics", "grad_x_weight,magnitude,act_mag",
        "--temporal-stability", "--stability-batches", "2", "--target-components",
        "attn_qkv,mlp_down", "--advanced-perturbations", "progressive,clustered,targeted",
        "--progressive-k", "1,5,20", "--n-clusters", "2")
    sections_one = read(one, "enhanced_analysis.json")
    assert {"architecture", "targeting", "metric_correlation", "temporal_stability",
            "progressive_perturbation", "clustered_perturbation",
            "targeted_perturbation"} <= set(sections_one)
    assert sections_one["architecture"]["fused_qkv"]
    pairs = sections_one["metric_correlation"]["pairs"]
    assert any(p["spearman"] is not None and p["spearman"] < 0.99 for p in pairs)
    sections_two = read(two, "enhanced_analysis.json")
    assert all(sections_two[kind]["restore_verified"] for kind in
               ("progressive_perturbation", "clustered_perturbation", "targeted_perturbation"))
    assert_close_tree(sections_two, sections_one)


@pytest.mark.slow
def test_sharded_downstream_and_harness_tasks_equal_one_process(pair):
    """The built-in tasks (batches split over the processes) and lm-eval harness tasks (every
    process runs every request in lockstep), on the baseline and under each condition (the
    tiny-llama act_mag case's runs)."""
    one, two = pair(*case_args(*TASKS_CASE))
    results_one = read(one, "downstream_results.json")
    assert set(results_one["baseline"]) == {"hellaswag", "lambada", "cwa_hellaswag", "cwa_lambada"}
    assert results_one["conditions"] and read(two, "downstream_results.json") == results_one


@pytest.mark.slow
def test_sharded_checkpoint_and_super_weights_equal_one_process(tmp_path):
    """The built-in model, a checkpoint: rank 0 reads it, every rank receives its rows. It has
    super weights: the same candidates (activation peaks merged over the processes' batches),
    the same causal check and metric ranks, every weight restored on both ranks."""
    one, two = sharded_and_single(
        tmp_path, "--device", "cpu", "--max-length", "32", "--max-samples", "3", "--batch-size",
        "2", "--topk", "5", "--seeds", "0", "--metric", "grad_x_weight", "--mode", "per_tensor",
        "--perturb", "sign_flip", "--controls", "random_k", "--super-weights",
        "--super-weight-max", "1")
    top_one, top_two = pd.read_csv(one / "top_weights.csv"), pd.read_csv(two / "top_weights.csv")
    assert_same_selection(top_two, top_one, 3 * 32, per_tensor=True)
    assert_close_tree(read(two, "perturbation_results.json")["conditions"],
                      read(one, "perturbation_results.json")["conditions"])
    section_one = read(one, "enhanced_analysis.json")["super_weights"]
    section_two = read(two, "enhanced_analysis.json")["super_weights"]
    assert section_one["n_confirmed"] >= 1 and section_two["restore_verified"]
    assert_close_tree(section_two, section_one)
    manifest = read(two, "experiment_manifest.json")
    assert manifest["model"]["source"] == "builtin"
    assert manifest["sharding"]["parameter_bytes_held_by_rank_0"] <= \
        0.55 * manifest["sharding"]["parameter_bytes_total"]


@pytest.mark.slow
def test_sharded_load_error_on_rank_0_stops_every_rank_with_its_line(tmp_path):
    missing = tmp_path / "absent.gguf"
    proc = torchrun(*RUN, "--model", missing, "--shard", "--out-dir", tmp_path / "run")
    assert proc.returncode != 0
    assert proc.stderr.count(f"GGUF file '{missing}' does not exist") == 2  # both ranks say it
    assert not re.search(r'File ".*/src/', proc.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sharded_scores_file_is_one_process_file_both_ways(pair, tmp_path):
    """--save-scores under --shard writes the file one process writes (whole tensors, same
    model fingerprint), and --scores-from reads either into either layout (the tiny-gpt2 global
    case's runs are the sources)."""
    from safetensors.torch import load_file

    from src.sensitivity import score_store

    one, two = pair(*case_args(*GPT2_CASE))
    file_one, file_two = (folder / score_store.FILE_NAME for folder in (one, two))
    meta_one, meta_two = score_store.read_meta(file_one), score_store.read_meta(file_two)
    assert meta_two["model_fingerprint"] == meta_one["model_fingerprint"]
    assert meta_two["parameters"] == meta_one["parameters"]
    assert_scores_close(load_file(file_two), load_file(file_one), CALIBRATION_TOKENS)
    args = [*RUN, "--model", "random:tiny-gpt2", "--metric", "grad_x_weight", "--mode", "global",
            "--perturb", "zero"]
    for runner, source, out in ((torchrun, one, "sharded_from_one"), (run_cli, two, "one_from_sharded")):
        extra = ["--shard"] if runner is torchrun else []
        assert_ok(runner(*args, *extra, "--scores-from", source, "--out-dir", tmp_path / out))
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / out / "top_weights.csv"),
                                      pd.read_csv(source / "top_weights.csv"))
        manifest = json.loads((tmp_path / out / "experiment_manifest.json").read_text())
        assert manifest["scores_source"]["path"] == str(source / score_store.FILE_NAME)


@pytest.mark.slow
def test_sharded_run_resumes_where_it_stopped(pair, tmp_path):
    """A copy of the tiny-llama grad_squared case's sharded folder (--save-scores), cut back as
    a run killed after two conditions leaves it, resumed under torchrun --shard."""
    from src.sensitivity import score_store

    args = case_args(*RESUME_CASE)
    out = tmp_path / "run"
    shutil.copytree(pair(*args)[1], out)
    whole = json.loads((out / "perturbation_results.json").read_text())
    assert len(whole["conditions"]) > 2
    # as a run killed after two conditions leaves its folder
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    (out / "experiment_manifest.json").write_text(json.dumps({**manifest, "status": "failed"}))
    (out / "perturbation_results.json").write_text(
        json.dumps({**whole, "conditions": whole["conditions"][:2]}))
    assert_ok(torchrun(*args, "--shard", "--out-dir", out, "--resume"))
    resumed = json.loads((out / "perturbation_results.json").read_text())
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(resumed["conditions"]) == drop(whole["conditions"])
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["resumed"]["kept"]["scores"]
    assert manifest["resumed"]["kept"]["perturbation_conditions"] == 2
    assert not any(step.startswith("score_") for step in manifest["timings_seconds"])
    assert (out / score_store.FILE_NAME).is_file()  # --save-scores keeps them


@pytest.mark.slow
def test_sharded_benchmark_reports_every_figure(tmp_path):
    from tests.conftest import ROOT

    report = tmp_path / "bench.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               str(ROOT / "scripts" / "benchmark.py"), "--model", "random:tiny-llama", "--device",
               "cpu", "--shard", "--steps", "1", "--batch-size", "2", "--max-length", "32",
               "--json", str(report)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_ok(done)
    figures = json.loads(report.read_text())
    assert figures["world_size"] == 2
    text = json.dumps(figures)
    for figure in ("forward_backward", "score_grad_x_weight", "score_act_mag", "evaluate"):
        assert figure in text


@pytest.mark.slow
def test_sharded_load_of_a_corrupt_weights_file_stops_every_rank_with_its_line(tmp_path):
    from tests.test_loader import random_bytes_safetensors, save_tiny_model_folder

    folder = save_tiny_model_folder(tmp_path / "model")
    bad_file = random_bytes_safetensors(folder)
    proc = torchrun(*RUN, "--model", folder, "--shard", "--out-dir", tmp_path / "run")
    assert proc.returncode != 0
    assert proc.stderr.count(f"weights file '{bad_file}' is corrupt or truncated") == 2
    assert not re.search(r'File ".*/src/', proc.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sharded_finite_difference_hutchinson_equals_one_process(tmp_path):
    """Same probes and step sizes on both; every batch on every rank: diagonal and standard error
    equal up to float rounding of the gradients (FSDP averages two equal reduce-scatter terms).
    --hutchinson-samples auto: the top-K precision is taken over both ranks' rows (its cap of 4
    stops both: the target is unreachable), so both state the same probes and precision."""
    from safetensors.torch import load_file
    from src.sensitivity.score_store import read_meta
    args = ["--device", "cpu", "--max-length", "32", "--max-samples", "3", "--batch-size", "2",
            "--model", "random:tiny-llama", "--metric", "hutchinson_diag", "--hutchinson-hvp",
            "finite_difference", "--hutchinson-samples", "auto", "--hutchinson-max-samples", "4",
            "--hutchinson-rel-stderr", "1e-6", "--save-scores", "--topk", "5"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_cli(*args, "--out-dir", one))
    assert_ok(torchrun(*args, "--shard", "--out-dir", two))
    expected, got = load_file(one / "scores.safetensors"), load_file(two / "scores.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4,
                                   atol=1e-4 * float(tensor.abs().max()), msg=name)
    facts = [read_meta(folder / "scores.safetensors")["facts"] for folder in (one, two)]
    assert facts[0]["probes_per_batch"] == facts[1]["probes_per_batch"] == 4
    assert facts[1]["top_k_median_relative_stderr"] == pytest.approx(
        facts[0]["top_k_median_relative_stderr"], rel=1e-3)
