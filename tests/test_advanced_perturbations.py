"""Progressive, clustered and targeted perturbation; the --target-* restriction; the CLI end to end.

The progressive test builds a tiny Llama whose loss must grow with every zeroed top weight:
every token embeds to the same vector s*e0, attention and block-0 MLP write nothing, and the
block-1 MLP adds a*e1 with a = sum_j c_j * act_j (c_j > 0 in row 1 of down_proj, act_j > 0 the
same for every token). The head gives logit z(a) = 8a/sqrt(s^2 + a^2) (RMSNorm, hidden 64) to
every token that occurs in the data and 0 to all others, so each data token's probability grows
with a, and zeroing any c_j lowers a. With every c_j zeroed all logits are 0: perplexity = vocab.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from src.analysis import advanced_perturbations as adv
from src.analysis.context import AnalysisContext
from src.data.loading import DataSplit, TokenBlocks
from src.eval.perplexity import evaluate
from src.models.components import describe_parameters
from src.sensitivity.eligibility import eligible_parameters, restriction
from src.sensitivity.metrics import compute_scores
from src.sensitivity.perturb import PerturbOptions
from src.sensitivity.rank import top_k
from src.sensitivity.scoring import ScoringJob
from tests.conftest import load

DOWN = "model.layers.1.mlp.down_proj.weight"
DATA_TOKENS = torch.arange(5, 21)  # the tokens the data uses (|T| = 16)


def make_context(model, params, blocks, metric="magnitude", k=4, controls=("random_k",),
                 **settings):
    """A context as the pipeline builds it: K global, seeds 0 and 1, zero perturbation."""
    job = ScoringJob(model=model, params=params, blocks=blocks, batch_size=4, seed=0)
    scored = compute_scores(job, metric)
    data = DataSplit(blocks, blocks, "test", 2, 1, 1)
    defaults = {"perturb": "zero", "clustering_method": "kmeans", "n_clusters": 4,
                "dbscan_eps": None, "target_components": (), "target_layers": None,
                "layers": None}
    return AnalysisContext(
        model=model, params=params, scored=scored, selection=top_k(scored.scores, k, "global"),
        metas=describe_parameters(model, params), job=job, data=data,
        baseline=evaluate(model, blocks, 4), metric=metric, k=k, mode="global", seeds=(0, 1),
        controls=controls, method="zero", options=PerturbOptions(),
        settings=SimpleNamespace(**{**defaults, **settings}))


@pytest.fixture(scope="module")
def monotone_rig():
    torch.manual_seed(0)
    model = load("random:tiny-llama").model
    generator = torch.Generator().manual_seed(0)
    c = (0.5 + torch.rand(128, generator=generator)) * 1e-4           # distinct, positive
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "gate_proj.weight",
                              "up_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.zero_()[:, 0] = 1.0             # s = 1
        layer = model.model.layers[1].mlp
        layer.gate_proj.weight[:, 0] = 1.0                              # gate = up = 8 > 0
        layer.up_proj.weight[:, 0] = 1.0
        layer.down_proj.weight[1] = c
        model.lm_head.weight.zero_()[DATA_TOKENS, 1] = 1.0
    ids = DATA_TOKENS[torch.randint(len(DATA_TOKENS), (4, 16), generator=generator)]
    blocks = TokenBlocks(ids, torch.ones_like(ids))
    params = {DOWN: dict(model.named_parameters())[DOWN]}
    return model, params, blocks, c


def expected_perplexity(remaining_c_sum: float, vocab: int) -> float:
    act = 8.0 * torch.nn.functional.silu(torch.tensor(8.0)).item()
    a = remaining_c_sum * act
    z = 8.0 * a / math.sqrt(1.0 + a * a)
    n_t = len(DATA_TOKENS)
    return (n_t * math.exp(z) + vocab - n_t) / math.exp(z)


def test_progressive_top_k_curve_is_monotone_and_exact(monotone_rig):
    model, params, blocks, c = monotone_rig
    vocab = model.config.vocab_size
    ks = (1, 2, 8, 32, 100, 128, 1000, 10**7)
    ctx = make_context(model, params, blocks, progressive_k=ks)
    before = params[DOWN].detach().clone()
    result = adv.progressive(ctx)
    assert torch.equal(params[DOWN], before) and result["restore_verified"]
    curve = result["curve"]
    assert curve["k"] == [1, 2, 8, 32, 100, 128, 1000, 64 * 128]  # capped at all eligible weights
    assert result["k_capped"] == [10**7]
    top = curve["top_k_perplexity"]
    assert all(b > a for a, b in zip(top[:6], top[1:6])), top           # strictly up to all of c
    assert all(b >= a for a, b in zip(top, top[1:])), top
    ordered = torch.sort(c, descending=True).values.double()
    for k, ppl in zip(curve["k"], top):
        remaining = float(ordered[min(k, 128):].sum())
        assert ppl == pytest.approx(expected_perplexity(remaining, vocab), rel=2e-3)
    assert top[-1] == pytest.approx(vocab, rel=1e-4)
    assert ctx.baseline.perplexity < top[0]
    for point, k in zip(result["points"], curve["k"]):
        rows = [r for r in point["conditions"] if r["selection"] == "random_k"]
        assert [r["seed"] for r in rows] == [0, 1] and all(r["n_weights"] == k for r in rows)
    assert len(curve["random_k_mean_perplexity"]) == len(curve["k"])


@pytest.fixture(scope="module")
def llama_with_data(tiny_llama):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 2000, (4, 16), generator=generator)
    return tiny_llama.model, TokenBlocks(ids, torch.ones_like(ids))


def test_targeted_selection_touches_only_the_named_components(llama_with_data):
    model, blocks = llama_with_data
    targets = ("mlp_down", "attn_q")
    params = eligible_parameters(model, restriction(None, {1}, targets, False))
    assert sorted(params) == ["model.layers.1.mlp.down_proj.weight",
                              "model.layers.1.self_attn.q_proj.weight"]
    ctx = make_context(model, params, blocks, metric="grad_x_weight", k=6,
                       controls=("random_k", "bottom_k"), target_components=targets,
                       target_layers="1")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed_names = set()

    def checking_evaluate():
        for name, p in model.named_parameters():
            if not torch.equal(p, original[name]):
                changed_names.add(name)
        return evaluate(model, blocks, 4)

    ctx.evaluate = checking_evaluate
    result = adv.targeted(ctx)
    assert changed_names and changed_names <= set(params)
    assert changed_names == set(params)  # both targeted tensors were perturbed in some condition
    assert set(result["groups"]) == {"all_targeted", "mlp_down", "attn_q"}
    for group, g in result["groups"].items():
        assert set(g["touched"]["components"]) <= set(targets) and g["touched"]["layers"] == [1]
        if group != "all_targeted":
            assert set(g["touched"]["components"]) == {group}
        assert {r["selection"] for r in g["conditions"]} == {"top_k", "random_k", "bottom_k"}
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    assert result["targeting"]["tensors_per_component"] == {"attn_q": 1, "mlp_down": 1}


def test_clustered_perturbs_one_cluster_at_a_time(llama_with_data):
    model, blocks = llama_with_data
    params = eligible_parameters(model)
    ctx = make_context(model, params, blocks, metric="grad_x_weight", k=3, n_clusters=2)
    result = adv.clustered(ctx)
    clusters = result["clusters"]
    assert len(clusters) == 2 and result["restore_verified"]
    members = [set(c["tensors"]) for c in clusters.values()]
    assert members[0].isdisjoint(members[1]) and members[0] | members[1] == set(params)
    for cluster in clusters.values():
        tensors = set(cluster["tensors"])
        top = [r for r in cluster["conditions"] if r["selection"] == "top_k"]
        assert len(top) == 1 and top[0]["n_weights"] == 3
        assert sum(cluster["touched"]["components"].values()) == 3
        assert {ctx.metas[n].component for n in tensors} >= set(cluster["touched"]["components"])


def test_compare_metrics_scores_each_pass_once(llama_with_data, scoring_passes):
    """--compare-metrics with the run's hutchinson_diag: obd is derived from the run's own
    scores (no Hutchinson pass more; its top-K is that of ½·h·w² written out here),
    grad_squared and fisher_w2 share one Fisher pass; pairs follow the flag's order."""
    from src.analysis import correlation
    from src.sensitivity.stability import jaccard

    model, blocks = llama_with_data
    params = eligible_parameters(model, restriction(None, {1}, ("mlp_down", "attn_q"), False))
    compared = ("obd", "hutchinson_diag", "grad_squared", "fisher_w2", "magnitude")
    ctx = make_context(model, params, blocks, metric="hutchinson_diag", k=6,
                       compare_metrics=compared)
    assert scoring_passes["hutchinson_diag"] == 1  # the run's own scoring
    section = correlation.run(ctx)
    assert {m: n for m, n in scoring_passes.items() if n} == {
        "hutchinson_diag": 1, "grad_squared": 1, "magnitude": 1}
    assert section["metrics"] == list(compared)
    pairs = {(p["a"], p["b"]): p for p in section["pairs"]}
    assert list(pairs)[:4] == [("obd", m) for m in compared[1:]]
    saliency = {n: 0.5 * ctx.scores[n] * params[n].detach().float() ** 2 for n in params}
    assert pairs[("obd", "hutchinson_diag")]["jaccard"] == pytest.approx(
        jaccard(top_k(saliency, 6, "global"), ctx.selection))


def test_eligible_restriction_intersects_layers_and_keeps_components():
    assert restriction({0, 1, 2, 3}, {2, 3, 4, 5}, ("attn_q",), False).layers == {2, 3}
    assert restriction(None, None, (), False) == restriction(None, None, None, False)
    assert restriction(None, None, (), False).components is None


# ----------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_runs_every_analysis_on_a_tiny_model(cli, tmp_path):
    extra = tmp_path / "other.txt"
    extra.write_text(" ".join(f"word{i} and more text number {i}." for i in range(400)))
    out = tmp_path / "run"
    done = cli("--model", "random:tiny-llama", "--max-length", 32, "--max-samples", 4,
               "--topk", 5, "--seeds", "0,1", "--weight-analysis", "--n-clusters", 2,
               "--compare-metrics", "grad_x_weight,magnitude", "--architecture-analysis",
               "--temporal-stability", "--conditions-data", extra, "--temporal-k", "5,20",
               "--advanced-perturbations", "progressive,clustered,targeted",
               "--progressive-k", "1,10,100000", "--target-components", "mlp_down,attn_q",
               "--out-dir", out)
    assert done.returncode == 0, done.stderr[-3000:]
    enhanced = json.loads((out / "enhanced_analysis.json").read_text())
    assert set(enhanced) >= {"targeting", "weight_analysis", "metric_correlation", "architecture",
                             "temporal_stability", "progressive_perturbation",
                             "clustered_perturbation", "targeted_perturbation"}
    assert set(enhanced["architecture"]["by_component"]) == {"attn_q", "mlp_down"}
    progressive = enhanced["progressive_perturbation"]  # per_tensor: K capped at q_proj's 64*64
    assert progressive["curve"]["k"] == [1, 10, 64 * 64] and progressive["k_capped"] == [100000]
    assert progressive["restore_verified"] and progressive["method"] == "zero"
    temporal = enhanced["temporal_stability"]
    assert [s["label"] for s in temporal["snapshots"]][-1] == "file:other.txt"
    assert set(temporal["drift"]) == {"calibration_prefixes", "seeds", "conditions"}
    assert enhanced["metric_correlation"]["pairs"][0]["spearman"] is not None
    config = json.loads((out / "config.json").read_text())
    assert config["target_components"] == ["mlp_down", "attn_q"]
    top = (out / "top_weights.csv").read_text().splitlines()[1:]
    assert {line.split(",")[3] for line in top} == {"attn_q", "mlp_down"}


@pytest.mark.parametrize("args,message", [
    (["--n-clusters", "3"], "--n-clusters has no effect"),
    (["--advanced-perturbations", "targeted"], "needs --target-components"),
    (["--target-components", "norm"], "norm weights are 1-D"),
    (["--target-components", "embedding"], "add --include-embeddings"),
    (["--target-components", "attn_x"], "unknown --target-components entry"),
    (["--target-layers", "3-1"], "bad --target-layers"),
    (["--compare-metrics", "magnitude"], "at least two"),
    (["--temporal-k", "5"], "--temporal-k has no effect"),
    (["--advanced-perturbations", "sideways"], "unknown --advanced-perturbations"),
    (["--weight-analysis", "--clustering-method", "kmeans", "--dbscan-eps", "0.5"], "--dbscan-eps"),
    (["--temporal-stability", "--conditions-data", "/nonexistent.txt"], "does not exist"),
    (["--advanced-perturbations", "clustered", "--n-clusters", "50"], "exceeds the 14 scored"),
    (["--weight-analysis", "--layers", "0", "--target-components", "attn_q"],
     "at least 2 scored tensors"),
])
def test_cli_rejects_flags_without_effect_or_bad_values(capsys, tmp_path, args, message):
    from src.cli import main

    assert main(["--model", "random:tiny-llama", "--out-dir", str(tmp_path / "x"), *args]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "x").exists()
