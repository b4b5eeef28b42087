"""scripts/benchmark.py on a tiny preset: every figure is in the JSON with the spread of its
repeats, ratios are paired with their ceiling round by round, and the bare forward+backward
differentiates only the scored weights into gradient buffers kept across steps."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from src.bench.measure import paired_ratio, repeat_summary
from src.bench.reference import gradient_step, scored_gradients_kept
from src.sensitivity.eligibility import eligible_parameters
from src.sensitivity.hutchinson import uses_hutchinson
from src.sensitivity.metrics import METRICS
from src.sensitivity.scoring import gradients_only_on, loss_sum
from tests.conftest import ROOT, load

SCRIPT = ROOT / "scripts" / "benchmark.py"


def run_benchmark(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = run_benchmark("--model", "random:tiny-llama", "--batch-size", "2", "--max-length", "16",
                         "--steps", "1", "--repeats", "2", "--topk", "5", "--device", "cpu",
                         "--json", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text()), proc.stdout


@pytest.mark.slow
def test_every_figure_is_reported(report):
    data, stdout = report
    scored = [figure for m in METRICS  # --hutchinson-hvp auto: both HVPs of hutchinson_diag, obd
              for figure in (f"score_{m}", *([f"score_{m}_finite_difference"]
                                             if uses_hutchinson(m) else []))]
    expected = ["forward", "forward_backward", *scored, "evaluate",
                "topk_global", "topk_per_tensor", "perturb_restore", "quantize_rtn"]
    assert list(data["figures"]) == expected
    for name, figure in data["figures"].items():
        assert "error" not in figure, name
        assert figure["seconds"] > 0 and figure["peak_memory_bytes"] > 0, name
        repeats = figure["seconds_repeats"]
        assert len(repeats) == 2, name
        assert figure["seconds"] == pytest.approx(statistics.median(repeats))
        assert (figure["seconds_min"], figure["seconds_max"]) == (min(repeats), max(repeats))
        spread = (max(repeats) - min(repeats)) / figure["seconds"]
        assert figure["spread"] == pytest.approx(spread)
        assert name in stdout  # the printed table has a row per figure
    assert data["tokens_per_figure"] == 2 * 1 * 16
    assert any(line.startswith("figure") and "spread" in line for line in stdout.splitlines())
    assert data["peak_memory_bytes"] == max(f["peak_memory_bytes"] for f in data["figures"].values())


@pytest.mark.slow
def test_ratios_are_against_the_matching_ceiling(report):
    figures = report[0]["figures"]
    for name, figure in figures.items():
        data_metric = name.startswith("score_") and \
            METRICS[name[6:].removesuffix("_finite_difference")].uses_data
        if name == "evaluate" or data_metric:
            ceiling = "forward" if name in ("evaluate", "score_act_mag") else "forward_backward"
            assert figure["ceiling"] == ceiling
            assert figure["tokens_per_s"] == pytest.approx(figure["tokens"] / figure["seconds"])
            # the ceiling timed again in the same rounds as the figure: the median paired ratio
            paired = figure["ceiling_seconds_repeats"]
            assert len(paired) == len(figure["seconds_repeats"]) == 2
            ratios = [(figure["tokens"] / mine) / (figures[ceiling]["tokens"] / theirs)
                      for mine, theirs in zip(figure["seconds_repeats"], paired)]
            assert figure["ratio"] == pytest.approx(statistics.median(ratios))
            spread = (max(ratios) - min(ratios)) / figure["ratio"]
            assert figure["ratio_spread"] == pytest.approx(spread)
            assert figure["cost_x_ceiling"] == pytest.approx(1 / figure["ratio"])
        else:
            assert figure["ratio"] is None and figure["ratio_spread"] is None
    assert "1 probe" in figures["score_hutchinson_diag"]["note"]
    assert "double_backward" in figures["score_hutchinson_diag"]["note"]
    assert "finite_difference" in figures["score_hutchinson_diag_finite_difference"]["note"]


@pytest.mark.slow
def test_bad_model_is_a_one_line_error():
    proc = run_benchmark("--model", "random:no-such-preset", "--steps", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_repeat_summary_is_the_median_and_the_spread_of_the_repeats():
    summary = repeat_summary([3.0, 1.0, 2.0])
    assert summary == {"seconds": 2.0, "seconds_min": 1.0, "seconds_max": 3.0, "spread": 1.0,
                       "seconds_repeats": [3.0, 1.0, 2.0]}
    assert repeat_summary([0.5])["spread"] == 0.0


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    # rounds of 2 s, 1 s, 4 s against a ceiling (twice the tokens) of 1 s, 1 s, 1 s
    paired = paired_ratio(100, [2.0, 1.0, 4.0], 200, [1.0, 1.0, 1.0])
    assert paired == {"ratio": 0.25, "ratio_spread": (0.5 - 0.125) / 0.25,
                      "cost_x_ceiling": 4.0, "ceiling_seconds_repeats": [1.0, 1.0, 1.0]}


def test_reference_step_differentiates_only_the_scored_weights_into_kept_buffers():
    torch.manual_seed(0)
    model = load("random:tiny-gpt2").model  # tied wte = lm_head: embeddings and head unscored
    scored = eligible_parameters(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with gradients_only_on(model, scored):
        expected = dict(zip(scored, torch.autograd.grad(loss_sum(model, ids, mask),
                                                        list(scored.values()))))
    with scored_gradients_kept(model, scored):
        buffers = {name: p.grad.data_ptr() for name, p in scored.items()}
        for _ in range(2):  # the same batch twice: both gradients accumulate in the buffers
            gradient_step(model, ids, mask)
        for name, p in model.named_parameters():
            if name in scored:
                assert p.grad.data_ptr() == buffers[name], name
                torch.testing.assert_close(p.grad, 2 * expected[name])
            else:
                assert p.grad is None and not p.requires_grad, name
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


ESTIMATED = ("forward", "forward_backward", "score_grad_x_weight", "score_hutchinson_diag",
             "score_hutchinson_diag_finite_difference")


def test_memory_estimate_matches_the_same_passes_tracked_on_real_tensors():
    """The fake model's estimate of each pass against the same tracker on the real float32
    model running real CPU kernels (within 5%), and above what must be alive at its peak."""
    from types import SimpleNamespace
    from src.bench import estimate

    args = SimpleNamespace(batch_size=2, max_length=32, hutchinson_batch_size=1,
                           hutchinson_hvp="auto", hutchinson_mode="whole",
                           hutchinson_moments="device", estimate_gpu_gb=80.0,
                           gradient_checkpointing=False)
    metrics = ["grad_x_weight", "hutchinson_diag"]
    fake, mode = estimate.fake_model("random:tiny-llama", torch.float32)
    real = load("random:tiny-llama").model.eval()
    estimated = {name: estimate.peak_bytes(fake, run, mode)[0]
                 for name, (run, _, _) in estimate.passes(fake, args, metrics).items()}
    measured = {name: estimate.peak_bytes(real, run)[0]
                for name, (run, _, _) in estimate.passes(real, args, metrics).items()}
    params = sum(p.numel() * 4 for p in real.parameters())
    scored = sum(p.numel() * 4 for p in eligible_parameters(real).values())
    logits = 2 * 32 * real.config.vocab_size * 4
    for name in ESTIMATED:
        assert estimated[name] == pytest.approx(measured[name], rel=0.05), name
    assert estimated["forward"] >= params + logits
    assert estimated["forward_backward"] >= params + scored + logits  # kept .grad buffers
    assert estimated["score_hutchinson_diag"] >= params + 2 * scored  # mean and M2 moments
    host_args = SimpleNamespace(**{**vars(args), "hutchinson_moments": "host"})
    for name, (run, _, _) in estimate.passes(fake, host_args, ["hutchinson_diag"]).items():
        if name.startswith("score_hutchinson_diag"):
            device, _, host = estimate.peak_bytes(fake, run, mode)
            assert host >= 2 * scored, name  # the moments, counted in host memory
            assert device <= estimated[name] - scored, name  # and not on the device


def test_estimate_memory_cli_writes_every_figure_with_the_estimate_kind(tmp_path):
    from src.bench.cli import main

    path = tmp_path / "estimate.json"
    assert main(["--model", "random:tiny-llama", "--dtype", "float32", "--batch-size", "2",
                 "--max-length", "16", "--metrics", "magnitude,grad_x_weight,hutchinson_diag",
                 "--estimate-memory", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["peak_memory_kind"] == ("estimate (FakeTensorMode + MemTracker, float32, "
                                          "attention sdpa)")
    figures = report["figures"]
    assert list(figures) == ["forward", "forward_backward", "score_magnitude",
                             "score_grad_x_weight", *ESTIMATED[3:], "evaluate"]
    params = report["model"]["n_parameters"] * 4
    assert all(f["peak_memory_bytes"] > params for f in figures.values())
    assert figures["forward"]["peak_memory_bytes"] < figures["forward_backward"]["peak_memory_bytes"]
    assert report["peak_memory_bytes"] == max(f["peak_memory_bytes"] for f in figures.values())
    assert "seconds" not in figures["forward"]  # nothing timed


SHARDED_SETTINGS = dict(batch_size=2, max_length=32, hutchinson_batch_size=1,
                        hutchinson_hvp="auto", hutchinson_mode="whole",
                        hutchinson_moments="device", estimate_gpu_gb=80.0,
                        gradient_checkpointing=False,
                        metrics="grad_x_weight,grad_squared,act_mag,hutchinson_diag")


def measured_on_two_gloo_ranks(tmp_path) -> dict:
    """{figure: rank 0's peak} of the estimate's passes on the real sharded tiny-llama."""
    from tests.test_distributed import free_port

    out = tmp_path / "peaks.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               str(ROOT / "tests" / "sharded_peaks.py"), str(out), json.dumps(SHARDED_SETTINGS)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def held_bytes(tensors, world_size: int) -> int:
    """Bytes one rank holds of ``tensors`` sharded: ⌈rows / N⌉ rows of each (torch.chunk)."""
    return sum(-(-t.shape[0] // world_size) * (t.numel() // t.shape[0]) * t.element_size()
               for t in tensors)


@pytest.mark.slow
def test_sharded_memory_estimate_matches_two_real_gloo_ranks(tmp_path):
    """The estimate sharded over 2 fake ranks against the same tracker on rank 0 of a real
    2-process gloo run of the same passes (within 5%), and above what one rank must hold."""
    from types import SimpleNamespace
    from src.bench import estimate

    measured = measured_on_two_gloo_ranks(tmp_path)
    args = SimpleNamespace(**SHARDED_SETTINGS)
    metrics = args.metrics.split(",")
    whole, mode = estimate.fake_model("random:tiny-llama", torch.float32)
    one_process = estimate.peak_bytes(whole, estimate.passes(whole, args, [])["forward"][0], mode)
    fake, mode = estimate.fake_model("random:tiny-llama", torch.float32)
    params = sum(p.numel() * 4 for p in fake.parameters())
    held = held_bytes(fake.parameters(), 2)
    root = sum(p.numel() * 4 for n, p in fake.named_parameters() if ".layers." not in n)
    block = sum(p.numel() * 4 for p in fake.model.layers[0].parameters())
    logits = 2 * 32 * fake.config.vocab_size * 4
    with estimate.fake_ranks(2) as ranks:
        estimate.shard_fake(fake, mode, ranks)
        estimated = {name: estimate.peak_bytes(fake, run, mode)[:2]
                     for name, (run, _, _) in estimate.passes(fake, args, metrics, ranks).items()}
    assert list(estimated) == list(measured) == [
        "forward", "forward_backward", *[f"score_{m}" for m in metrics], "evaluate"]
    for name, (peak, breakdown) in estimated.items():
        assert peak == pytest.approx(measured[name], rel=0.05), name
        assert breakdown["Sharded Param"] == held >= params / 2, name  # its rows, not the whole
    forward, breakdown = estimated["forward"]
    assert breakdown["Unsharded Param"] >= root  # the root (embeddings, head) gathered whole
    assert forward >= held + root + max(block, logits)
    scored = held_bytes(eligible_parameters(whole).values(), 2)  # kept .grad: the rank's rows
    assert estimated["forward_backward"][0] >= held + scored + root + logits
    # tiny-llama's embeddings and head are 99% of its weights: the root's all-gather buffer and
    # its gathered copy (alive together while FSDP2 copies out) outweigh the half not held
    assert forward > one_process[0]


def test_sharded_estimate_cli_reports_one_rank_of_n_and_leaves_no_process_group(tmp_path):
    import torch.distributed as dist
    from src.bench.cli import main

    path = tmp_path / "sharded.json"
    assert main(["--model", "random:tiny-llama", "--dtype", "float32", "--batch-size", "2",
                 "--max-length", "16", "--metrics", "magnitude,grad_x_weight,hutchinson_diag",
                 "--estimate-memory", "--estimate-shard-over", "4", "--json", str(path)]) == 0
    assert not dist.is_initialized()
    report = json.loads(path.read_text())
    assert report["world_size"] == 4
    assert report["peak_memory_kind"] == ("estimate (FakeTensorMode + FSDPMemTracker, float32, "
                                          "attention sdpa), sharded over 4 ranks (one rank's peak)")
    figures = report["figures"]
    assert list(figures) == ["forward", "forward_backward", "score_magnitude",
                             "score_grad_x_weight", "score_hutchinson_diag", "evaluate"]
    assert "finite_difference" in figures["score_hutchinson_diag"]["note"]
    sharding = report["sharding"]
    assert sharding["world_size"] == 4 and sharding["backend"] == "fake"
    assert sharding["parameter_bytes_total"] == report["model"]["n_parameters"] * 4
    held = sharding["parameter_bytes_held_by_rank_0"]
    assert held < sharding["parameter_bytes_total"] / 3
    for name, figure in figures.items():
        assert figure["peak_memory_breakdown"]["Sharded Param"] == held, name
    assert report["peak_memory_bytes"] == max(f["peak_memory_bytes"] for f in figures.values())


@pytest.mark.parametrize("flags, message", [
    (["--estimate-shard-over", "2"], "needs --estimate-memory"),
    (["--estimate-memory", "--estimate-shard-over", "1"], "at least 2 ranks"),
    (["--estimate-memory", "--estimate-shard-over", "2", "--hutchinson-hvp", "double_backward"],
     "does not run under --shard"),
    (["--estimate-memory", "--shard"], "--estimate-shard-over N"),
])
def test_estimate_shard_over_refuses_what_it_cannot_estimate(capsys, flags, message):
    from src.bench.cli import parse_args

    with pytest.raises(SystemExit) as stopped:
        parse_args(["--model", "random:tiny-llama", *flags])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
