"""Advanced analyses on hand-made data: every number checked against a direct computation
(numpy / scipy / sklearn), independent of the code under test."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import kurtosis, pearsonr, spearmanr

from src.analysis import architecture as arch
from src.analysis import clustering, correlation, temporal, weight_analysis as wa
from src.analysis.context import cap_ks, global_selection, mean_abs_by_layer, sample_positions
from src.errors import UserError
from src.models.components import ParamMeta, describe_parameters
from src.sensitivity.rank import top_k
from src.sensitivity.stability import jaccard, seed_subset, spearman


def meta(name, layer, component, shape, transposed=False):
    return ParamMeta(name, layer, component, shape, transposed)


# ----------------------------------------------------------------------------- enrichment

def test_enrichment_arithmetic_by_hand():
    slices = [arch.Slice("a", "attn_q", 0, 100, 10.0, 6),
              arch.Slice("b", "mlp_up", 0, 300, 10.0, 2),
              arch.Slice("c", "mlp_up", 1, 600, 40.0, 2)]
    by_component = arch.aggregate(slices, lambda s: s.component)
    q, up = by_component["attn_q"], by_component["mlp_up"]
    # 1000 weights, mass 60, K = 10
    assert q["weight_share"] == pytest.approx(0.1) and up["weight_share"] == pytest.approx(0.9)
    assert q["topk_share"] == pytest.approx(0.6) and q["enrichment"] == pytest.approx(6.0)
    assert up["enrichment"] == pytest.approx(0.4 / 0.9)
    assert q["expected_topk_count"] == pytest.approx(1.0)
    assert q["mass_share"] == pytest.approx(10 / 60) and q["mass_enrichment"] == pytest.approx((10 / 60) / 0.1)
    assert q["mean_score"] == pytest.approx(0.1) and up["mean_score"] == pytest.approx(50 / 900)
    assert up["n_tensors"] == 2 and up["topk_count"] == 4
    by_layer = arch.aggregate(slices, lambda s: str(s.layer))
    assert by_layer["0"]["enrichment"] == pytest.approx(0.8 / 0.4)


def test_architecture_on_a_tiny_llama_matches_direct_counts(tiny_llama):
    model = tiny_llama.model
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n
              and "lm_head" not in n}
    metas = describe_parameters(model, params)
    generator = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(p.shape, generator=generator) * (3.0 if "k_proj" in n else 1.0)
              for n, p in params.items()}
    selection = top_k(scores, 2, "per_tensor")
    result = arch.architecture_analysis(scores, metas, selection, "per_tensor", model)
    glob = top_k(scores, 2 * len(scores), "global")  # same size as the per_tensor selection
    assert result["k"] == 2 * len(scores)
    n_all = sum(s.numel() for s in scores.values())
    for component, group in result["by_component"].items():
        names = [n for n in scores if metas[n].component == component]
        n_c = sum(scores[n].numel() for n in names)
        count = sum(glob[n].numel() for n in names if n in glob)
        assert group["n_weights"] == n_c
        assert group["score_mass"] == pytest.approx(float(sum(scores[n].sum() for n in names)), rel=1e-5)
        assert group["topk_count"] == count
        assert group["enrichment"] == pytest.approx((count / result["k"]) / (n_c / n_all))
    assert result["by_component"]["attn_k"]["enrichment"] > 2  # k_proj scores were tripled
    assert result["attention"]["by_mean_score"][0] == "attn_k"
    assert set(result["not_scored"]["norm"]) == {"1-D (norm weight or bias): never scored"}
    assert "embedding" in result["not_scored"] and "head" in result["not_scored"]
    depth = result["depth"]
    assert depth["n_layers"] == 2 and set(depth["thirds"]) <= {"early", "middle", "late"}


def test_fused_qkv_split_in_architecture_for_gpt2():
    from tests.conftest import load

    model = load("random:tiny-gpt2").model
    name = "transformer.h.0.attn.c_attn.weight"   # stored [in=64, out=192]
    metas = describe_parameters(model, [name])
    score = torch.ones(64, 192)
    score[:, 64:128] = 4.0                        # the k third of the output columns (stored)
    selection = {name: torch.tensor([0 * 192 + 70, 3 * 192 + 100, 5 * 192 + 150])}  # k, k, v
    result = arch.architecture_analysis({name: score}, metas, selection, "global", model)
    by = result["by_component"]
    assert set(by) == {"attn_q", "attn_k", "attn_v"}
    assert by["attn_k"]["n_weights"] == 64 * 64 and by["attn_k"]["score_mass"] == 4.0 * 64 * 64
    assert (by["attn_q"]["topk_count"], by["attn_k"]["topk_count"], by["attn_v"]["topk_count"]) == (0, 2, 1)
    assert result["fused_qkv"][name] == "split into q/k/v"


# ----------------------------------------------------------------------------- Spearman, Jaccard

def test_jaccard_by_hand():
    a = {"w": torch.tensor([0, 1, 2]), "u": torch.tensor([5])}
    b = {"w": torch.tensor([1, 2, 3]), "v": torch.tensor([5])}
    assert jaccard(a, b) == pytest.approx(2 / 6)  # {w1, w2} of {w0..w3, u5, v5}
    assert jaccard(a, a) == 1.0


def test_metric_pair_statistics_match_scipy():
    torch.manual_seed(0)
    sizes = {"l0.w": (6, 5), "l1.w": (4, 5), "l2.w": (5, 5)}
    metas = {n: meta(n, i, "mlp_up", s) for i, (n, s) in enumerate(sizes.items())}
    a = {n: torch.randn(s) for n, s in sizes.items()}
    b = {n: a[n] * 0.5 + torch.randn(s) for n, s in sizes.items()}
    sel_a, sel_b = top_k(a, 4, "global"), top_k(b, 4, "global")
    sample = sample_positions({n: int(np.prod(s)) for n, s in sizes.items()}, seed=0, n=10)
    result = correlation.compare_score_sets({"a": a, "b": b}, {"a": sel_a, "b": sel_b}, sample, metas)
    pair = result["pairs"][0]
    # positions by hand: the sample plus both top-4 sets, per tensor
    flat_a = {n: a[n].reshape(-1).abs() for n in sizes}
    flat_b = {n: b[n].reshape(-1).abs() for n in sizes}
    xs, ys = [], []
    for n in sizes:
        chosen = set(sample.get(n, torch.empty(0)).tolist()) | set(sel_a.get(n, torch.empty(0)).tolist()) \
            | set(sel_b.get(n, torch.empty(0)).tolist())
        xs += [float(flat_a[n][i]) for i in sorted(chosen)]
        ys += [float(flat_b[n][i]) for i in sorted(chosen)]
    assert result["n_positions"] == len(xs)
    assert pair["spearman"] == pytest.approx(spearmanr(xs, ys).statistic)
    layer_a = [float(a[n].abs().mean()) for n in sizes]
    layer_b = [float(b[n].abs().mean()) for n in sizes]
    assert pair["layer_spearman"] == pytest.approx(spearmanr(layer_a, layer_b).statistic)
    assert pair["layer_pearson"] == pytest.approx(pearsonr(layer_a, layer_b).statistic, rel=1e-5)
    ta = {(n, int(i)) for n, idx in sel_a.items() for i in idx}
    tb = {(n, int(i)) for n, idx in sel_b.items() for i in idx}
    assert pair["jaccard"] == pytest.approx(len(ta & tb) / len(ta | tb))


def test_spearman_handles_ties_and_constants_like_scipy():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 4.0, 9.0])
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert spearman(x, np.ones(5)) is None


def test_sample_positions_are_seeded_and_capped():
    sizes = {"a": 50, "b": 70}
    s1, s2 = sample_positions(sizes, seed=3, n=30), sample_positions(sizes, seed=3, n=30)
    assert all(torch.equal(s1[n], s2[n]) for n in s1) and sum(v.numel() for v in s1.values()) == 30
    assert sum(v.numel() for v in sample_positions(sizes, seed=3, n=10**6).values()) == 120


# ----------------------------------------------------------------------------- profiles, clustering

def test_profile_numbers_match_numpy():
    generator = torch.Generator().manual_seed(0)
    score = torch.randn(100, 200, generator=generator) ** 3  # heavy tail, signed
    profile = clustering.tensor_profiles({"w": score}, {"w": meta("w", 0, "attn_q", (100, 200))})["w"]
    a = np.abs(score.numpy().astype(np.float64)).reshape(-1)
    ordered = np.sort(a)[::-1]
    assert profile["mean"] == pytest.approx(a.mean(), rel=1e-5)
    assert profile["p99"] == pytest.approx(np.quantile(a, 0.99), rel=1e-4)
    assert profile["top_share_1pct"] == pytest.approx(ordered[:200].sum() / a.sum(), rel=1e-5)
    assert profile["top_share_0.01pct"] == pytest.approx(ordered[:2].sum() / a.sum(), rel=1e-5)
    assert profile["kurtosis"] == pytest.approx(kurtosis(a, fisher=False), rel=1e-3)


def _two_family_profiles():
    rng = np.random.default_rng(0)
    profiles = {}
    for i in range(12):
        heavy = i % 2 == 0
        p50 = 1e-4 * (1 + 0.05 * rng.random())
        profiles[f"t{i}"] = {"layer": i, "component": "mlp_up", "numel": 100,
                             "mean": p50 * (3 if heavy else 1.1), "p50": p50,
                             "p99": p50 * (100 if heavy else 3) * (1 + 0.05 * rng.random()),
                             "max": p50 * (1e4 if heavy else 5),
                             "top_share_0.01pct": 0.3 if heavy else 0.001,
                             "top_share_1pct": 0.6 if heavy else 0.02,
                             "kurtosis": 500.0 if heavy else 3.0}
    return profiles


def test_kmeans_separates_two_profile_families_and_silhouette_matches_sklearn():
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    profiles = _two_family_profiles()
    result = cluster(profiles, "kmeans", n_clusters=2)
    labels = result["labels"]
    assert len({labels[f"t{i}"] for i in range(0, 12, 2)}) == 1
    assert len({labels[f"t{i}"] for i in range(1, 12, 2)}) == 1
    assert labels["t0"] != labels["t1"]
    x = StandardScaler().fit_transform(clustering.profile_features(profiles))
    expected = silhouette_score(x, [labels[n] for n in profiles])
    assert result["silhouette"] == pytest.approx(expected)
    assert sum(c["n_tensors"] for c in result["clusters"].values()) == 12


def test_dbscan_marks_an_outlier_as_noise():
    profiles = _two_family_profiles()
    profiles["odd"] = dict(profiles["t1"], mean=10.0, p50=1e-9, p99=1e-2, max=50.0,
                           kurtosis=1e6, **{"top_share_0.01pct": 0.99, "top_share_1pct": 0.999})
    result = cluster(profiles, "dbscan")
    assert result["labels"]["odd"] == -1 and result["n_noise"] >= 1
    assert result["n_clusters_found"] == len(set(result["labels"].values()) - {-1})
    assert wa.summary_lines({"n_tensors": 13, "clustering": result, "profiles": {},
                             "heaviest_tail": None, "hotspots": {"channels": {}}})
    assert result["eps"] > 0


def cluster(profiles, method, n_clusters=4, dbscan_eps=None):
    settings = SimpleNamespace(clustering_method=method, n_clusters=n_clusters,
                               dbscan_eps=dbscan_eps)
    return clustering.cluster_tensors(profiles, settings, seed=0)


def test_cluster_count_is_checked_against_the_scored_tensors_before_the_run():
    preflight = SimpleNamespace(params=dict.fromkeys(_two_family_profiles()))
    with pytest.raises(UserError, match="--n-clusters 50 exceeds the 12 scored tensors"):
        clustering.check_clusterable(SimpleNamespace(clustering_method="kmeans", n_clusters=50),
                                     preflight)
    clustering.check_clusterable(SimpleNamespace(clustering_method="kmeans", n_clusters=12),
                                 preflight)
    with pytest.raises(UserError, match="at least 2 scored tensors"):
        clustering.check_clusterable(SimpleNamespace(clustering_method="dbscan", n_clusters=4),
                                     SimpleNamespace(params={"only": None}))


# ----------------------------------------------------------------------------- hotspots

def test_line_hotspots_in_out_in_coordinates():
    linear = meta("lin", 0, "mlp_up", (4, 8))           # [out=4, in=8]
    conv = meta("conv", 0, "mlp_up", (8, 4), True)      # GPT-2 Conv1D stored [in=8, out=4]
    selection = {"lin": torch.tensor([3, 11, 19, 0]),  # (0,3) (1,3) (2,3) (0,0): column 3 x3
                 "conv": torch.tensor([1, 5, 9])}      # stored (0,1) (1,1) (2,1): out row 1 x3
    hot = {(h["parameter"], h["axis"]): h for h in wa.line_hotspots(selection, {"lin": linear, "conv": conv})}
    assert hot[("lin", "col")]["index"] == 3 and hot[("lin", "col")]["count"] == 3
    assert hot[("lin", "col")]["fold_over_uniform"] == pytest.approx(3 / (4 / 8))
    assert hot[("conv", "row")]["index"] == 1 and hot[("conv", "row")]["count"] == 3


def test_channel_hotspots_count_reads_and_writes_of_the_residual_stream():
    metas = {"q": meta("q", 0, "attn_q", (8, 4)), "down": meta("down", 0, "mlp_down", (4, 6)),
             "o": meta("o", 0, "attn_o", (4, 4))}   # o_proj: input = heads, not the residual
    selection = {"q": torch.tensor([2, 6, 10]),      # [out, in=4]: cols 2, 2, 2 -> reads channel 2
                 "down": torch.tensor([6, 7, 0]),    # [out=4, in=6]: rows 1, 1, 0 -> writes 1, 1, 0
                 "o": torch.tensor([0, 4, 8, 12])}   # rows 0..3 written; col 0 is not a "read"
    result = wa.channel_hotspots(selection, metas, hidden=4)
    assert result["reads"]["n_weights"] == 3
    assert result["reads"]["top_channels"] == [{"channel": 2, "count": 3, "n_tensors": 1,
                                                "fold_over_uniform": 3 / (3 / 4)}]
    writes = {c["channel"]: c["count"] for c in result["writes"]["top_channels"]}
    assert writes == {0: 2, 1: 3, 2: 1, 3: 1} and result["writes"]["n_weights"] == 7


# ----------------------------------------------------------------------------- temporal drift

def _snap(label, sel):
    return temporal.Snapshot(label, label, 1, {3: sel}, np.arange(5, dtype=float), {})


def test_drift_is_one_minus_jaccard_and_flags_past_the_threshold():
    snaps = {"a": _snap("a", {"w": torch.tensor([0, 1, 2])}),
             "b": _snap("b", {"w": torch.tensor([0, 1, 3])}),   # J(a,b) = 2/4
             "c": _snap("c", {"w": torch.tensor([4, 5, 6])})}   # J(b,c) = 0
    result = temporal.drift(snaps, {"seq": ["a", "b", "c"]}, [3], threshold=0.6)["seq"]
    assert [s["drift"] for s in result["steps"]] == [0.5, 1.0]
    assert [s["flagged"] for s in result["steps"]] == [False, True]
    assert result["n_flagged"] == 1 and result["mean_drift"] == 0.75


def test_prefixes_and_seed_subsets():
    assert temporal.prefix_ends(4, 3) == [2, 3, 4]
    assert temporal.prefix_ends(2, 5) == [1, 2]
    subset = seed_subset(10, 0.5, seed=1)
    assert subset.numel() == 5 and torch.equal(subset, seed_subset(10, 0.5, seed=1))


# ----------------------------------------------------------------------------- helpers

def test_cap_ks_and_global_selection():
    sizes = {"a": 10, "b": 30}
    assert cap_ks([1, 5, 100], sizes, "global") == ([1, 5, 40], [100])
    assert cap_ks([1, 20], sizes, "per_tensor") == ([1, 10], [20])
    scores = {"a": torch.arange(10.0), "b": torch.arange(30.0) / 100}
    per_tensor = top_k(scores, 2, "per_tensor")
    glob = global_selection(scores, per_tensor, "per_tensor")
    assert set(glob) == {"a"} and glob["a"].numel() == 4


def test_mean_abs_by_layer():
    scores = {"x.layers.0.a": -torch.ones(2, 2), "x.layers.0.b": torch.full((2, 6), 3.0),
              "x.layers.1.a": torch.full((2, 2), 2.0)}
    metas = {n: meta(n, int(n.split(".")[2]), "mlp_up", tuple(s.shape)) for n, s in scores.items()}
    assert mean_abs_by_layer(scores, metas) == {"0": pytest.approx((4 + 36) / 16), "1": 2.0}
    assert math.isclose(mean_abs_by_layer(scores, metas)["1"], 2.0)
