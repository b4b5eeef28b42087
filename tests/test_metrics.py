"""Each metric against an independent computation on tiny models."""
from __future__ import annotations

import pytest
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src.data.loading import TokenBlocks
from src.distributed.ranks import Ranks
from src.sensitivity import hutchinson, hvp
from src.sensitivity.hutchinson import HutchinsonSettings
from src.sensitivity.eligibility import eligible_parameters
from src.sensitivity.metrics import METRICS, compute_many, compute_scores
from src.sensitivity.scoring import ScoringJob, gradients_only_on

VOCAB = 32


def micro_llama(hidden=8, intermediate=12, layers=1, seed=0):
    """A Llama small enough for an exact Hessian (a few hundred scored weights)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so curvature is not tiny
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    return model


def blocks(n=6, length=10, seed=1, pad_last=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return TokenBlocks(ids, mask)


def direct_mean_loss(model, data: TokenBlocks):
    """Token-mean NLL over all valid predicted positions, written out independently."""
    logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, data.input_ids[:, 1:, None]).squeeze(-1)
    valid = (data.attention_mask[:, 1:] * data.attention_mask[:, :-1]).bool()
    return -picked[valid].mean()


def job_for(model, data, **kwargs):
    params = eligible_parameters(model)
    return ScoringJob(model=model, params=params, blocks=data, **kwargs)


def probes(samples: int, block: bool = False) -> dict:
    """ScoringJob settings: hutchinson_diag with ``samples`` probes per batch."""
    return {HutchinsonSettings: HutchinsonSettings(hutchinson_samples=samples,
                                                   hutchinson_block=block)}


def test_each_metric_does_what_its_registry_entry_declares():
    """uses_data: the scores change with the calibration blocks exactly for the metrics that
    declare it; signed: only a signed metric gives negative scores."""
    assert set(METRICS) >= {"grad_x_weight", "grad_squared", "hutchinson_diag", "magnitude",
                            "act_mag", "random", "obd", "fisher_w2"}
    model = micro_llama()
    for name, metric in METRICS.items():
        first, second = (compute_scores(job_for(model, blocks(seed=seed), settings=probes(2)),
                                        name).scores for seed in (1, 2))
        changed = any(not torch.equal(first[n], second[n]) for n in first)
        assert changed == metric.uses_data, name
        negative = any(bool((s < 0).any()) for s in first.values())
        assert negative == metric.signed, name


def test_grad_x_weight_matches_autograd_over_all_tokens():
    model, data = micro_llama(), blocks(pad_last=3)
    scores = compute_scores(job_for(model, data, batch_size=4), "grad_x_weight").scores
    name = "model.layers.0.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name]
    grad, = torch.autograd.grad(direct_mean_loss(model, data), weight)
    torch.testing.assert_close(scores[name], (grad * weight).abs().detach(), rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_grad_squared_is_mean_of_per_sequence_squared_gradients():
    model, data = micro_llama(), blocks(n=5, pad_last=4)
    scores = compute_scores(job_for(model, data, batch_size=2), "grad_squared").scores
    name = "model.layers.0.self_attn.q_proj.weight"
    weight = dict(model.named_parameters())[name]
    expected = torch.zeros_like(weight)
    for i in range(len(data)):
        grad, = torch.autograd.grad(direct_mean_loss(model, data.subset([i])), weight)
        expected += grad ** 2
    torch.testing.assert_close(scores[name], expected / len(data), rtol=1e-4, atol=1e-9)
    # the square of the summed gradient is a different quantity
    grad_all, = torch.autograd.grad(direct_mean_loss(model, data), weight)
    assert not torch.allclose(scores[name], grad_all ** 2, rtol=1e-2)


def test_act_mag_matches_manual_input_norms():
    model, data = micro_llama(), blocks(pad_last=2)
    scores = compute_scores(job_for(model, data, batch_size=3), "act_mag").scores
    captured = []
    mlp = model.model.layers[0].mlp
    handle = mlp.down_proj.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    handle.remove()
    x = captured[0][data.attention_mask.bool()]  # real tokens only
    column_norm = x.pow(2).sum(0).sqrt()
    expected = mlp.down_proj.weight.detach().abs() * column_norm[None, :]
    torch.testing.assert_close(scores["model.layers.0.mlp.down_proj.weight"], expected,
                               rtol=1e-4, atol=1e-6)


def test_act_mag_on_gpt2_conv1d_uses_input_rows():
    from tests.conftest import load
    tiny = load("random:tiny-gpt2")
    ids = torch.randint(0, 1000, (2, 8))
    data = TokenBlocks(ids, torch.ones_like(ids))
    scores = compute_scores(job_for(tiny.model, data), "act_mag").scores
    captured = []
    fc = tiny.model.transformer.h[0].mlp.c_fc  # Conv1D weight is [in, out]
    handle = fc.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        tiny.model(input_ids=ids)
    handle.remove()
    norm = captured[0].reshape(-1, captured[0].shape[-1]).pow(2).sum(0).sqrt()
    torch.testing.assert_close(scores["transformer.h.0.mlp.c_fc.weight"],
                               fc.weight.detach().abs() * norm[:, None], rtol=1e-4, atol=1e-6)


def test_magnitude_and_random():
    model, data = micro_llama(), blocks()
    mag = compute_scores(job_for(model, data), "magnitude").scores
    for name, p in eligible_parameters(model).items():
        assert torch.equal(mag[name], p.detach().abs())
    first = compute_scores(job_for(model, data, seed=3), "random").scores
    again = compute_scores(job_for(model, data, seed=3), "random").scores
    other = compute_scores(job_for(model, data, seed=4), "random").scores
    name = next(iter(first))
    assert torch.equal(first[name], again[name])
    assert not torch.equal(first[name], other[name])
    assert 0.0 <= float(first[name].min()) and float(first[name].max()) < 1.0


def test_scoring_leaves_requires_grad_and_mode_unchanged():
    model, data = micro_llama(), blocks()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compute_scores(job_for(model, data), "grad_x_weight")
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- Hutchinson

def exact_hessian_diagonal(model, data, names):
    """diag of the exact Hessian of the token-mean NLL, one HVP per unit vector."""
    params = dict(model.named_parameters())
    tensors = [params[n] for n in names]
    with hutchinson.double_backward_attention(model):
        loss = direct_mean_loss(model, data)
        grads = torch.autograd.grad(loss, tensors, create_graph=True)
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        diagonal = torch.empty_like(flat_grad)
        for i in range(flat_grad.numel()):
            row = torch.autograd.grad(flat_grad[i], tensors, retain_graph=True)
            diagonal[i] = torch.cat([r.reshape(-1) for r in row])[i]
    out, start = {}, 0
    for n, t in zip(names, tensors):
        out[n] = diagonal[start:start + t.numel()].view_as(t).detach()
        start += t.numel()
    return out


@pytest.fixture(scope="module")
def hessian_case():
    model = micro_llama(hidden=8, intermediate=8)
    data = blocks(n=2, length=8)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    return model, data, names, exact_hessian_diagonal(model, data, names)


def relative_error(estimate, exact):
    num = sum(float((estimate[n] - exact[n]).norm() ** 2) for n in exact) ** 0.5
    den = sum(float(exact[n].norm() ** 2) for n in exact) ** 0.5
    return num / den


@pytest.mark.slow
def test_hutchinson_converges_to_exact_diagonal(hessian_case):
    model, data, names, exact = hessian_case
    params = {n: dict(model.named_parameters())[n] for n in names}
    errors = {}
    for n_probes in (64, 4096):
        job = ScoringJob(model=model, params=params, blocks=data, batch_size=2,
                         settings=probes(n_probes), seed=0)
        errors[n_probes] = relative_error(compute_scores(job, "hutchinson_diag").scores, exact)
    assert errors[4096] < 0.35 * errors[64], errors
    assert errors[4096] < 0.15, errors


def test_hutchinson_is_exact_on_a_separable_quadratic():
    # L(w) = sum a_i w_i^2 has H = diag(2a), and z * (H z) = 2a for every Rademacher z.
    weight = torch.nn.Parameter(torch.randn(5, 7))
    curvature = torch.rand(5, 7) * 3
    stats = {"w": hutchinson.WeightedWelford(weight.shape, weight.device)}
    loss = (curvature * weight ** 2).sum()
    hutchinson.probe_batch(loss, {"w": weight}, stats, seed=0, batch_index=0,
                           probe_indices=range(3), weight=1 / 3)
    torch.testing.assert_close(stats["w"].mean, 2 * curvature)
    assert torch.all(stats["w"].take_standard_error() < 1e-5)


def test_weighted_welford_matches_the_weighted_formulas():
    """Mean Σwx/Σw and standard error sqrt(s² / n_eff), s² = Σw(x - mean)² / (V1 - V2/V1) the
    unbiased (reliability-weighted) variance, n_eff = V1²/V2, computed directly in float64."""
    generator = np.random.default_rng(4)
    samples = generator.normal(size=(9, 3, 4)) * generator.uniform(0.1, 5, size=(1, 3, 4))
    weights = generator.uniform(0.05, 1.0, size=9)
    stats = hutchinson.WeightedWelford((3, 4), torch.device("cpu"))
    for sample, weight in zip(samples, weights):
        stats.update(torch.tensor(sample, dtype=torch.float32), float(weight))
    v1, v2 = weights.sum(), (weights ** 2).sum()
    mean = np.tensordot(weights, samples, axes=1) / v1
    variance = np.tensordot(weights, (samples - mean) ** 2, axes=1) / (v1 - v2 / v1)
    np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.take_standard_error().numpy(),
                               np.sqrt(variance / (v1 ** 2 / v2)), rtol=1e-5)


@pytest.mark.slow
def test_hutchinson_block_mode_matches_whole_model(hessian_case):
    model = micro_llama(hidden=8, intermediate=8, layers=2, seed=5)
    data = blocks(n=2, length=8)
    params = eligible_parameters(model)
    results = {}
    for block in (False, True):
        job = ScoringJob(model=model, params=params, blocks=data, batch_size=2,
                         settings=probes(300, block), seed=7)
        results[block] = compute_scores(job, "hutchinson_diag").scores
    # same probes per weight; only cross-block terms (zero in expectation) differ
    assert relative_error(results[True], results[False]) < 0.3  # 0.23 measured at 300 probes


def test_hutchinson_restores_attention_and_reports_stderr():
    model, data = micro_llama(), blocks(n=4)
    assert model.config._attn_implementation == "sdpa"
    out = compute_scores(job_for(model, data, settings=probes(4), batch_size=2),
                         "hutchinson_diag")
    assert model.config._attn_implementation == "sdpa"
    name = "model.layers.0.mlp.up_proj.weight"
    assert out.extra["stderr"][name].shape == out.scores[name].shape
    assert torch.all(out.extra["stderr"][name] >= 0)
    assert (out.scores[name] < 0).any(), "signed estimate keeps negative curvature"


def auto_probes(target: float, cap: int, hvp_kind: str = "double_backward") -> dict:
    return {HutchinsonSettings: HutchinsonSettings(
        hutchinson_samples="auto", hutchinson_rel_stderr=target, hutchinson_max_samples=cap,
        hutchinson_hvp=hvp_kind)}


def median_top_k_relative_stderr(output, k: int) -> float:
    """Directly from the scores and standard errors: the k largest |estimates| of all weights."""
    scores = torch.cat([s.flatten() for s in output.scores.values()])
    stderr = torch.cat([s.flatten() for s in output.extra["stderr"].values()])
    top = torch.topk(scores.abs(), k).indices
    return float((stderr[top] / scores[top].abs()).median())


@pytest.mark.parametrize("hvp_kind", ["double_backward", "finite_difference"])
def test_auto_samples_stop_at_the_first_round_that_reaches_the_target(hvp_kind):
    """auto draws rounds of 4 probes per batch and stops at the first whose top-K median
    relative standard error is at most the target: its estimate is the fixed-count estimate
    with as many probes (the same probes), one round fewer misses the target."""
    model, data = micro_llama(), blocks(n=4)
    k, target = 20, 0.555  # measured: 0.564 after 8 probes per batch, 0.546 after 12

    def scored(settings):
        return compute_scores(job_for(model, data, batch_size=2, topk=k, settings=settings),
                              "hutchinson_diag")

    auto = scored(auto_probes(target, 64, hvp_kind))
    n = auto.facts["probes_per_batch"]
    assert n % hutchinson.AUTO_ROUND == 0 and 4 < n < 64, auto.facts
    assert auto.facts["reached"] and auto.facts["top_k_median_relative_stderr"] <= target
    fixed = scored(fd_probes(n, hvp_kind=hvp_kind))
    assert relative_error(auto.scores, fixed.scores) < 1e-5
    assert auto.facts["top_k_median_relative_stderr"] == pytest.approx(
        median_top_k_relative_stderr(fixed, k), rel=1e-5)
    fewer = scored(fd_probes(n - hutchinson.AUTO_ROUND, hvp_kind=hvp_kind))
    assert median_top_k_relative_stderr(fewer, k) > target
    assert fixed.facts["top_k_median_relative_stderr"] == pytest.approx(
        auto.facts["top_k_median_relative_stderr"], rel=1e-5)


def test_auto_samples_in_block_mode_stop_block_by_block_and_state_the_worst():
    model, data = micro_llama(layers=2), blocks(n=4)
    settings = {HutchinsonSettings: HutchinsonSettings(
        hutchinson_samples="auto", hutchinson_block=True, hutchinson_rel_stderr=0.6,
        hutchinson_max_samples=12)}
    facts = compute_scores(job_for(model, data, batch_size=2, topk=10, settings=settings),
                           "hutchinson_diag").facts
    blocks_ = facts["per_block"]
    assert len(blocks_) == 2 and all(b["probes_per_batch"] % 4 == 0 for b in blocks_)
    assert facts["top_k_median_relative_stderr"] == max(
        b["top_k_median_relative_stderr"] for b in blocks_)
    assert facts["probes_per_batch"] == max(b["probes_per_batch"] for b in blocks_)
    assert facts["reached"] == all(b["top_k_median_relative_stderr"] <= 0.6 for b in blocks_)


def test_auto_samples_stop_at_the_cap_and_say_the_target_was_missed():
    model, data = micro_llama(), blocks(n=4)
    out = compute_scores(job_for(model, data, batch_size=2, topk=5,
                                 settings=auto_probes(1e-6, 6)), "hutchinson_diag")
    assert out.facts["probes_per_batch"] == 6 and out.facts["reached"] is False
    assert out.facts["cap"] == 6 and out.facts["target"] == 1e-6
    one = compute_scores(job_for(model, blocks(n=2), batch_size=2, topk=5,
                                 settings=probes(1)), "hutchinson_diag")
    assert one.facts["top_k_median_relative_stderr"] is None  # one sample: no standard error


def test_gradient_checkpointing_recomputes_blocks_and_keeps_every_gradient_score(monkeypatch):
    """Each decoder block runs twice per batch (forward, then again in the backward), the scores
    equal the plain pass's (measured bit for bit on the CPU), grad_squared keeps its one-backward
    per-sample path, and the blocks' forward methods are restored afterwards."""
    from src.sensitivity import fisher

    model, data = micro_llama(layers=2), blocks(n=4)
    first = model.model.layers[1].input_layernorm  # recomputation may stop early, not before it
    calls = []
    first.register_forward_hook(lambda *args: calls.append(1))

    def per_sequence(*args):
        raise AssertionError("grad_squared left its per-sample path")

    monkeypatch.setattr(fisher, "_per_sequence_squared_grads", per_sequence)
    cases = (("grad_x_weight", {}), ("grad_squared", {}),
             ("hutchinson_diag", fd_probes(2, hvp_kind="double_backward")),
             ("hutchinson_diag", fd_probes(2)))
    for metric, settings in cases:
        out, passes = {}, {}
        for recompute in (False, True):
            calls.clear()
            job = job_for(model, data, batch_size=2, settings=settings,
                          gradient_checkpointing=recompute)
            out[recompute] = compute_scores(job, metric)
            passes[recompute] = len(calls)
        assert passes[True] > passes[False] > 0, (metric, passes)
        assert relative_error(out[True].scores, out[False].scores) <= 1e-6, metric
    assert all("forward" not in vars(block) for block in model.model.layers)


# ------------------------------------------------- Hutchinson by finite differences (hvp.py)

def fd_probes(samples: int, block: bool = False, hvp_kind: str = "finite_difference") -> dict:
    return {HutchinsonSettings: HutchinsonSettings(hutchinson_samples=samples,
                                                   hutchinson_block=block,
                                                   hutchinson_hvp=hvp_kind)}


def test_finite_difference_hvp_matches_exact_hvp(hessian_case):
    """Central differences in float32 with the default step sizes against the exact H Δw of the
    float64 model (double backward), Δw the step taken: relative error <= 1e-3 (measured 1e-4;
    eps^(1/2)·rms steps give 6e-4, 0.1·rms 4e-2)."""
    import copy
    model, data, names, _ = hessian_case
    wide = copy.deepcopy(model).double()
    group = {n: dict(model.named_parameters())[n] for n in names}
    originals = {n: p.detach().clone() for n, p in group.items()}
    epsilon = hvp.step_sizes(group, Ranks())
    probes = {n: hvp.rademacher_like(p, 0, n, 0, 0) for n, p in group.items()}
    central = hvp.CentralDifference(group, originals, epsilon, probes.__getitem__)
    step = {n: central.shifted(n, 1).double() - central.shifted(n, -1).double() for n in names}
    samples = {}
    with gradients_only_on(model, group):
        central.forward_pass(lambda: direct_mean_loss(model, data))
        central.backward_pass(lambda: direct_mean_loss(model, data), samples.__setitem__)
    hvp.restore(group, originals)
    difference = {n: samples[n].double() * step[n] for n in names}  # Δg = (Δg / Δw) · Δw
    for n in names:
        torch.testing.assert_close(step[n], 2 * epsilon[n] * probes[n].double(), rtol=1e-4, atol=0)
    tensors = [dict(wide.named_parameters())[n] for n in names]
    with hutchinson.double_backward_attention(wide):
        grads = torch.autograd.grad(direct_mean_loss(wide, data), tensors, create_graph=True)
        exact = torch.autograd.grad(grads, tensors, grad_outputs=[step[n] for n in names])
    assert relative_error(difference, dict(zip(names, exact))) <= 1e-3


def test_finite_difference_estimate_equals_double_backward_with_the_same_probes():
    """One scored tensor per group (whole model: one tensor; block mode: one per block), so every
    step is 2εz with one ε: the samples are the double backward's z ⊙ (H z) with the same probes
    up to the finite-difference error, and so are the estimate and its standard error."""
    model = micro_llama(hidden=8, intermediate=8, layers=2, seed=5)
    data = blocks(n=3, length=8, pad_last=2)
    named = dict(model.named_parameters())
    for block, names in ((False, ["model.layers.1.mlp.up_proj.weight"]),
                         (True, [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)])):
        out = {}
        for kind in ("double_backward", "finite_difference"):
            job = ScoringJob(model=model, params={n: named[n] for n in names}, blocks=data,
                             batch_size=2, seed=3, settings=fd_probes(3, block, kind))
            out[kind] = compute_scores(job, "hutchinson_diag")
        exact, fd = out["double_backward"], out["finite_difference"]
        assert relative_error(fd.scores, exact.scores) < 2e-3, block
        assert relative_error(fd.extra["stderr"], exact.extra["stderr"]) < 2e-3, block


@pytest.mark.slow
def test_finite_difference_converges_to_exact_diagonal(hessian_case):
    model, data, names, exact = hessian_case
    params = {n: dict(model.named_parameters())[n] for n in names}
    errors = {}
    for n_probes in (64, 1024):  # measured 0.65 and (4096 probes, 6 min) 0.056, as exact H z
        job = ScoringJob(model=model, params=params, blocks=data, batch_size=2, seed=0,
                         settings=fd_probes(n_probes))
        errors[n_probes] = relative_error(compute_scores(job, "hutchinson_diag").scores, exact)
    assert errors[1024] < 0.35 * errors[64], errors
    assert errors[1024] < 0.2, errors


def test_finite_difference_restores_weights_bit_exactly():
    """float32 and bfloat16 (an outlier that ε cannot move takes one-ulp steps), fused SDPA kept."""
    for dtype in (torch.float32, torch.bfloat16):
        model = micro_llama().to(dtype)
        name = "model.layers.0.mlp.down_proj.weight"
        with torch.no_grad():
            dict(model.named_parameters())[name][0, 0] = 4096.0
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = compute_scores(job_for(model, blocks(n=3), batch_size=2, settings=fd_probes(2)),
                             "hutchinson_diag")
        assert model.config._attn_implementation == "sdpa"
        for n, p in model.named_parameters():
            assert torch.equal(p.detach().view(torch.int16 if dtype == torch.bfloat16 else
                                               torch.int32),
                               before[n].view(p.detach().view(torch.int16 if dtype ==
                                              torch.bfloat16 else torch.int32).dtype)), n
        assert torch.isfinite(out.scores[name]).all()


def test_perturbed_steps_are_never_zero_and_follow_the_probe():
    original = torch.tensor([1.0, -300.0, 0.0, 1e-3], dtype=torch.bfloat16)
    direction = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.bfloat16)
    plus = hvp.perturbed(original, 0.01, direction)
    minus = hvp.perturbed(original, 0.01, -direction)
    step = (plus.float() - minus.float()) * direction.float()
    assert torch.all(step > 0)
    assert float(plus[1]) == float(torch.nextafter(original[1:2], torch.tensor(
        [-1e30], dtype=torch.bfloat16)))  # -300 ± 0.01 rounds back: one ulp instead


def test_hvp_setting_auto_decides_by_sharding_and_is_recorded():
    from src.sensitivity.metrics import option_value
    job = job_for(micro_llama(), blocks(), settings=fd_probes(1, hvp_kind="auto"))
    assert option_value("hutchinson_diag", job, "hutchinson_hvp") == "double_backward"
    job.ranks = Ranks(0, 2, sharded=True)
    assert option_value("hutchinson_diag", job, "hutchinson_hvp") == "finite_difference"
    assert HutchinsonSettings().hutchinson_hvp == "auto"
    assert "hutchinson_hvp" in METRICS["hutchinson_diag"].options


# ------------------------------------------------ derived metrics: obd and fisher_w2 (saliency.py)

def half_w2(param) -> torch.Tensor:
    """½·w² in float32, written out here."""
    return 0.5 * param.detach().float() ** 2


def test_derived_metrics_inherit_their_bases_flags_and_follow_them(tmp_path):
    """A derived metric declares its base and its own sign; every other flag is its base's, so
    the Hutchinson flags apply to obd (and are recorded with its stored scores) and not to
    fisher_w2; --metric lists each after its base."""
    from src import steps
    from src.cli import config_from_argv
    from src.errors import UserError
    from src.sensitivity import score_store

    order = list(METRICS)
    for name, base in (("obd", "hutchinson_diag"), ("fisher_w2", "grad_squared")):
        derived, of = METRICS[name], METRICS[base]
        assert derived.base == base and order.index(name) > order.index(base)
        assert (derived.uses_data, derived.options, derived.shardable, derived.settings,
                derived.gradients) == (of.uses_data, of.options, of.shardable, of.settings,
                                       of.gradients), name
    assert METRICS["obd"].signed and not METRICS["fisher_w2"].signed
    config = config_from_argv(["--metric", "obd", "--hutchinson-samples", "3",
                               "--hutchinson-block", "--out-dir", str(tmp_path / "run")])
    job = steps.scoring_job(config, model=None, params={}, blocks=None, ranks=Ranks())
    options = score_store.describe("obd", job, "model", {"sha256": "data"}, 0.0)["options"]
    assert options == score_store.describe("hutchinson_diag", job, "model", {"sha256": "data"},
                                           0.0)["options"]
    assert options["hutchinson_samples"] == 3 and options["hutchinson_block"] is True
    with pytest.raises(UserError, match="--hutchinson-samples has no effect without "
                                        "hutchinson_diag, obd or --faithfulness"):
        config_from_argv(["--metric", "fisher_w2", "--hutchinson-samples", "3",
                          "--out-dir", str(tmp_path / "other")])


def test_obd_is_half_the_hessian_diagonal_times_w_squared(hessian_case):
    """Against hutchinson_diag scored on its own with the same seed: scores ½·h·w², standard
    errors ½·w²·stderr(h). Against the exact Hessian diagonal: the errors in units of obd's
    standard error behave as standard normal ones (256 probes: mean square 1.16, largest 3.2
    measured; a saliency off by any constant factor is thousands of standard errors away)."""
    model, data, names, exact = hessian_case
    params = {n: dict(model.named_parameters())[n] for n in names}

    def scored(metric):
        job = ScoringJob(model=model, params=params, blocks=data, batch_size=2, seed=0,
                         settings=probes(256))
        return compute_scores(job, metric)

    obd, hessian = scored("obd"), scored("hutchinson_diag")
    z_scores = []
    for n in names:
        torch.testing.assert_close(obd.scores[n], half_w2(params[n]) * hessian.scores[n],
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(obd.extra["stderr"][n],
                                   half_w2(params[n]) * hessian.extra["stderr"][n],
                                   rtol=1e-6, atol=0)
        exact_saliency = half_w2(params[n]) * exact[n]
        z_scores.append(((obd.scores[n] - exact_saliency) / obd.extra["stderr"][n]).flatten())
    z = torch.cat(z_scores)
    assert 0.5 < float((z ** 2).mean()) < 2.0 and float(z.abs().max()) < 5.0


def test_obd_states_the_precision_of_its_own_top_k():
    """obd's facts are hutchinson_diag's (same probes) with the median relative standard error
    over obd's own top-K, and under auto the stopping rule's top-K named; one sample: None."""
    from src.utils.report_console import score_facts_text

    model, data = micro_llama(), blocks(n=4)
    k = 10
    job = job_for(model, data, batch_size=2, topk=k, settings=auto_probes(0.5, 16))
    out = compute_many(job, ["hutchinson_diag", "obd"])
    hessian, obd = out["hutchinson_diag"], out["obd"]
    assert obd.facts["top_k_median_relative_stderr"] == pytest.approx(
        median_top_k_relative_stderr(obd, k), rel=1e-6)
    assert obd.facts["top_k_median_relative_stderr"] != pytest.approx(
        hessian.facts["top_k_median_relative_stderr"], rel=0.05)  # measured 0.63 and 0.42
    assert obd.facts["stopping_rule_top_k"] == "hutchinson_diag"
    assert "stopping_rule_top_k" not in hessian.facts
    assert "(--hutchinson-samples auto on hutchinson_diag's top-K, target 0.500" in \
        score_facts_text("obd", obd.facts)
    shared = {key: value for key, value in obd.facts.items()
              if key not in ("top_k_median_relative_stderr", "stopping_rule_top_k")}
    assert shared == {key: value for key, value in hessian.facts.items()
                      if key != "top_k_median_relative_stderr"}
    one = compute_scores(job_for(model, blocks(n=2), batch_size=2, topk=k, settings=probes(1)),
                         "obd")
    assert one.facts["top_k_median_relative_stderr"] is None


def test_fisher_w2_is_half_the_empirical_fisher_times_w_squared():
    """float64 model: ½·w²·mean over sequences of (∂L_s/∂w)², one autograd.grad per sequence
    (L_s its token-mean NLL, padding masked). The scores are float32 (every metric's), so they
    agree to float32 rounding (5e-7 relative measured), and bit for bit with ½·w²·grad_squared."""
    model, data = micro_llama().double(), blocks(n=5, pad_last=4)
    job = job_for(model, data, batch_size=2)
    fisher_w2, fisher = compute_scores(job, "fisher_w2"), compute_scores(job, "grad_squared")
    names = list(job.params)
    weights = [job.params[n] for n in names]
    squares = [torch.zeros_like(w) for w in weights]
    for i in range(len(data)):
        grads = torch.autograd.grad(direct_mean_loss(model, data.subset([i])), weights)
        for square, grad in zip(squares, grads):
            square += grad ** 2
    for n, w, square in zip(names, weights, squares):
        expected = 0.5 * w.detach() ** 2 * square / len(data)
        torch.testing.assert_close(fisher_w2.scores[n].double(), expected, rtol=2e-6, atol=0)
        assert torch.equal(fisher_w2.scores[n], half_w2(w) * fisher.scores[n]), n
        assert bool((fisher_w2.scores[n] >= 0).all())


def test_compute_many_runs_each_scoring_pass_once(scoring_passes):
    """hutchinson_diag with obd: one Hutchinson pass; grad_squared with fisher_w2: one Fisher
    pass; the tensors equal those of separate compute_scores calls, the bases' are left as they
    were, and a base in ``known`` is not computed again."""
    model, data = micro_llama(), blocks(n=4)
    job = job_for(model, data, batch_size=2, topk=10, settings=probes(3))
    names = ["hutchinson_diag", "obd", "fisher_w2", "grad_squared"]
    together = compute_many(job, names)
    assert list(together) == names
    assert scoring_passes["hutchinson_diag"] == 1 and scoring_passes["grad_squared"] == 1
    assert sum(scoring_passes.values()) == 2
    for name in names:
        alone = compute_scores(job, name)
        assert together[name].facts == alone.facts, name
        for key, tensors in [("scores", together[name].scores),
                             *together[name].extra.items()]:
            reference = alone.scores if key == "scores" else alone.extra[key]
            assert all(torch.equal(tensors[n], reference[n]) for n in reference), (name, key)
    assert scoring_passes["hutchinson_diag"] == 3  # compute_scores("obd") ran the base again
    hessian = together["hutchinson_diag"]
    kept = {n: s.clone() for n, s in hessian.scores.items()}
    derived = compute_many(job, ["obd"], known={"hutchinson_diag": hessian})["obd"]
    assert scoring_passes["hutchinson_diag"] == 3
    assert all(torch.equal(derived.scores[n], together["obd"].scores[n]) for n in kept)
    assert all(torch.equal(hessian.scores[n], kept[n]) for n in kept)



def test_shared_first_order_pass_equals_the_separate_passes_in_one_forward_per_batch(
        scoring_passes, monkeypatch):
    """grad_squared, grad_x_weight and act_mag scored together (fisher_w2 with them) come from
    one forward+backward per batch (src/sensitivity/first_order.py) and equal each metric's own
    pass up to float32 summation order, padding included (sequence shares n_s / N, masked input
    norms); without grad_squared each metric runs its own pass."""
    model, data = micro_llama(), blocks(n=5, pad_last=4)
    job = job_for(model, data, batch_size=2)
    separate = {m: compute_scores(job, m).scores for m in ("grad_squared", "grad_x_weight",
                                                           "act_mag", "fisher_w2")}
    for name in scoring_passes:
        scoring_passes[name] = 0
    forwards = []
    monkeypatch.setattr(model, "forward", _counting(model.forward, forwards))
    joint = compute_many(job, ["grad_x_weight", "fisher_w2", "act_mag", "grad_squared"])
    assert len(forwards) == 3  # ceil(5 / 2) batches, one forward each
    assert scoring_passes["grad_squared"] == scoring_passes["grad_x_weight"] == \
        scoring_passes["act_mag"] == 0  # the shared pass, not the metrics' own
    for metric, scores in separate.items():
        for name, expected in scores.items():
            torch.testing.assert_close(joint[metric].scores[name], expected, rtol=2e-5,
                                       atol=1e-7 * float(expected.abs().max()))
    forwards.clear()
    compute_many(job, ["grad_x_weight", "act_mag"])
    assert len(forwards) == 6 and scoring_passes["grad_x_weight"] == 1  # their own passes


def _counting(forward, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)
    return counted
