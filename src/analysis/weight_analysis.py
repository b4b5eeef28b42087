"""--weight-analysis: a sensitivity profile per weight tensor, clustering of tensors by profile,
and hotspots (tensors, rows and input channels where the top-K weights bunch up).

Every number is about |score| of the run's --metric (signed metrics rank by |score|).

Profile of one tensor (computed on its device, one host transfer per device):
  mean, std, max, quantiles p50/p90/p99/p99.9 (from a fixed sample of 1M entries on larger
  tensors), ``top_share_0.01pct`` / ``top_share_1pct`` = share of the tensor's total |score| held
  by its top 0.01% / 1% of weights (at least one weight), and ``kurtosis`` (plain, 3 = Gaussian).

Clustering features (standardised to zero mean / unit variance before clustering):
  log10 mean, log10(p99/p50), log10(max/p99), both top shares, log10 kurtosis.
``kmeans`` uses --n-clusters (default 4). ``dbscan`` uses min_samples = 3 and, unless
--dbscan-eps is given, eps = the 90th percentile of each tensor's distance to its 2nd nearest
other tensor (so about 90% of tensors are core points). Noise tensors get label -1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from src.analysis.context import AnalysisContext, global_selection, per_tensor, require
from src.models.components import ParamMeta, to_out_in
from src.sensitivity.rank import Selection, selection_size

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99_9": 0.999}
TOP_SHARES = {"top_share_0.01pct": 1e-4, "top_share_1pct": 1e-2}
QUANTILE_SAMPLE = 1_000_000
FEATURES = ["log10_mean", "log10_p99_over_p50", "log10_max_over_p99", "top_share_0.01pct",
            "top_share_1pct", "log10_kurtosis"]
DEFAULT_CLUSTERS = 4
DBSCAN_MIN_SAMPLES = 3
TINY = 1e-30  # keeps logs of ratios finite when a quantile is exactly 0
N_HOTSPOTS = 10


# ----------------------------------------------------------------------------- profiles

def _profile_numbers(score: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    a = score.detach().float().abs().reshape(-1)
    n = a.numel()
    sample = a
    if n > QUANTILE_SAMPLE:
        sample = a[torch.randint(n, (QUANTILE_SAMPLE,), generator=generator).to(a.device)]
    quantiles = torch.quantile(sample, torch.tensor(list(QUANTILES.values()), device=a.device))
    total = a.sum()
    shares = [torch.topk(a, max(1, math.ceil(f * n)), sorted=False).values.sum() / total
              for f in TOP_SHARES.values()]
    mean = a.mean()
    centered = a - mean
    kurtosis = centered.pow(4).mean() / centered.pow(2).mean().pow(2)
    return torch.stack([mean, a.std() if n > 1 else torch.zeros_like(mean), a.max(), *quantiles,
                        *shares, kurtosis])


PROFILE_KEYS = ["mean", "std", "max", *QUANTILES, *TOP_SHARES, "kurtosis"]


def tensor_profiles(scores, metas: dict[str, ParamMeta]) -> dict[str, dict]:
    """name -> {layer, component, numel, mean, std, max, p50..p99_9, top shares, kurtosis}."""
    generator = torch.Generator().manual_seed(0)
    host = per_tensor(scores, lambda s: _profile_numbers(s, generator))
    profiles = {}
    for name, values in host.items():
        meta = metas[name]
        profiles[name] = {"layer": meta.layer, "component": meta.component,
                          "numel": scores[name].numel(),
                          **{k: float(v) for k, v in zip(PROFILE_KEYS, values)}}
    return profiles


def profile_features(profiles: dict[str, dict]) -> np.ndarray:
    """[n_tensors, len(FEATURES)] raw (unstandardised) clustering features."""
    rows = []
    for p in profiles.values():
        rows.append([math.log10(p["mean"] + TINY),
                     math.log10((p["p99"] + TINY) / (p["p50"] + TINY)),
                     math.log10((p["max"] + TINY) / (p["p99"] + TINY)),
                     p["top_share_0.01pct"], p["top_share_1pct"],
                     math.log10(p["kurtosis"]) if p["kurtosis"] > 0 else math.nan])
    features = np.asarray(rows, dtype=float)
    column_means = np.nanmean(np.where(np.isfinite(features), features, np.nan), axis=0)
    column_means = np.nan_to_num(column_means)  # an all-NaN column (constant scores) -> 0
    bad = ~np.isfinite(features)
    features[bad] = np.take(column_means, np.nonzero(bad)[1])
    return features


# ----------------------------------------------------------------------------- clustering

def _kmeans(x: np.ndarray, n_clusters: int | None, eps: float | None, seed: int):
    from sklearn.cluster import KMeans

    k = n_clusters or DEFAULT_CLUSTERS
    require(k <= len(x), f"--n-clusters {k} exceeds the {len(x)} scored tensors")
    model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    return model.labels_, {"n_clusters": k, "inertia": float(model.inertia_)}


def _dbscan(x: np.ndarray, n_clusters: int | None, eps: float | None, seed: int):
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    min_samples = min(DBSCAN_MIN_SAMPLES, len(x))
    chosen = "given"
    if eps is None:
        distances, _ = NearestNeighbors(n_neighbors=min_samples).fit(x).kneighbors(x)
        eps = float(np.percentile(distances[:, -1], 90)) or 1e-6
        chosen = "90th percentile of the distance to the (min_samples-1)-th nearest tensor"
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(x).labels_
    return labels, {"eps": eps, "eps_rule": chosen, "min_samples": min_samples,
                    "n_noise": int((labels == -1).sum())}


CLUSTERERS = {"kmeans": _kmeans, "dbscan": _dbscan}


def silhouette(x: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette over non-noise tensors; None when fewer than 2 clusters or too few points."""
    from sklearn.metrics import silhouette_score

    keep = labels != -1
    n_labels = len(set(labels[keep].tolist()))
    if n_labels < 2 or n_labels >= int(keep.sum()):
        return None
    return float(silhouette_score(x[keep], labels[keep]))


def cluster_tensors(profiles: dict[str, dict], method: str, n_clusters: int | None = None,
                    eps: float | None = None, seed: int = 0) -> dict:
    """Cluster tensors by standardised profile features; labels and one summary per cluster."""
    from sklearn.preprocessing import StandardScaler

    require(method in CLUSTERERS, f"unknown --clustering-method '{method}'; choose one of "
                                  f"{', '.join(CLUSTERERS)}")
    require(len(profiles) >= 2, f"clustering needs at least 2 scored tensors (got {len(profiles)})")
    raw = profile_features(profiles)
    x = StandardScaler().fit_transform(raw)
    labels, details = CLUSTERERS[method](x, n_clusters, eps, seed)
    names = list(profiles)
    clusters = {}
    for label in sorted(set(labels.tolist())):
        members = [n for n, lab in zip(names, labels) if lab == label]
        rows = labels == label
        clusters[str(label)] = {
            "n_tensors": len(members), "tensors": members,
            "components": _counts(profiles[n]["component"] for n in members),
            "layers": sorted({profiles[n]["layer"] for n in members if profiles[n]["layer"] is not None}),
            "mean_features": dict(zip(FEATURES, raw[rows].mean(axis=0).round(6).tolist())),
            "n_weights": int(sum(profiles[n]["numel"] for n in members)),
        }
    score = silhouette(x, labels)
    n_found = len(set(labels.tolist()) - {-1})
    return {"method": method, **details, "features": FEATURES, "standardised": True,
            "n_clusters_found": n_found, "silhouette": score,
            "silhouette_note": None if score is not None else
            f"undefined: {n_found} cluster(s) besides noise (needs 2 or more)",
            "labels": dict(zip(names, labels.tolist())), "clusters": clusters}


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------- hotspots

def hidden_size(model) -> int:
    config = model.config
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return int(model.get_input_embeddings().weight.shape[1])


def line_hotspots(selection: Selection, metas: dict[str, ParamMeta], top: int = N_HOTSPOTS) -> list[dict]:
    """Rows (output units) and columns (input channels) of one tensor holding several top-K
    weights. ``fold`` = count / (n selected in the tensor / lines on that axis), the multiple of
    what uniform placement would put there."""
    found = []
    for name, idx in selection.items():
        n = idx.numel()
        if n < 2:
            continue
        meta = metas[name]
        rows, cols = to_out_in(meta, idx.cpu())
        n_out, n_in = meta.shape_out_in[0], meta.shape_out_in[1]
        for axis, coords, n_lines in (("row", rows, n_out), ("col", cols, n_in)):
            counts = torch.bincount(coords, minlength=n_lines)
            count, where = counts.max(dim=0)
            if int(count) >= 2:
                found.append({"parameter": name, "layer": meta.layer, "component": meta.component,
                              "axis": axis, "index": int(where), "count": int(count),
                              "n_selected_in_tensor": n, "share": int(count) / n,
                              "fold_over_uniform": int(count) / (n / n_lines)})
    return sorted(found, key=lambda h: (-h["fold_over_uniform"], -h["count"]))[:top]


# Components whose input is the (normalised) residual stream, and those whose output is added to
# it. Norms scale each channel, so channel j means the same hidden unit on both sides. A shape
# test would not do: o_proj's input (the heads' output) can have the hidden size too.
READS_RESIDUAL = ("attn_q", "attn_k", "attn_v", "attn_qkv", "mlp_gate", "mlp_up", "head")
WRITES_RESIDUAL = ("attn_o", "mlp_down")


def channel_hotspots(selection: Selection, metas: dict[str, ParamMeta], hidden: int,
                     top: int = N_HOTSPOTS) -> dict:
    """Residual-stream channels shared by top-K weights across tensors: ``reads`` counts the
    input channel (column) of weights that read the residual stream, ``writes`` the output
    channel (row) of weights that write it; ``fold_over_uniform`` = count / (n / hidden)."""
    result = {}
    for role, axis, components in (("reads", 1, READS_RESIDUAL), ("writes", 0, WRITES_RESIDUAL)):
        counts = torch.zeros(hidden, dtype=torch.long)
        tensors = torch.zeros(hidden, dtype=torch.long)
        n_total = 0
        for name, idx in selection.items():
            meta = metas[name]
            if meta.component not in components or meta.shape_out_in[axis] != hidden:
                continue
            coords = to_out_in(meta, idx.cpu())[axis]
            per_channel = torch.bincount(coords, minlength=hidden)
            counts += per_channel
            tensors += (per_channel > 0).long()
            n_total += idx.numel()
        order = torch.argsort(counts, descending=True, stable=True)[:top]
        expected = n_total / hidden
        result[role] = {"components": list(components), "n_weights": n_total,
                        "expected_per_channel": expected,
                        "top_channels": [{"channel": int(ch), "count": int(counts[ch]),
                                          "n_tensors": int(tensors[ch]),
                                          "fold_over_uniform": int(counts[ch]) / expected}
                                         for ch in order.tolist() if int(counts[ch]) > 0]}
    return result


def tensor_hotspots(selection: Selection, sizes: dict[str, int], metas, top: int = N_HOTSPOTS) -> list[dict]:
    """Tensors holding the most of a global top-K, with enrichment over their share of weights."""
    k_total = selection_size(selection)
    n_total = sum(sizes.values())
    rows = []
    for name, idx in selection.items():
        share = idx.numel() / k_total
        expected = sizes[name] / n_total
        rows.append({"parameter": name, "layer": metas[name].layer,
                     "component": metas[name].component, "count": int(idx.numel()),
                     "share_of_topk": share, "share_of_weights": expected,
                     "enrichment": share / expected})
    return sorted(rows, key=lambda r: -r["count"])[:top]


def hotspots(ctx: AnalysisContext) -> dict:
    mode = ctx.config.mode
    glob = global_selection(ctx.scores, ctx.selection, mode)
    return {
        "k": ctx.config.topk, "mode": mode,
        "lines_from": f"the run's top-K ({mode})",
        "lines": line_hotspots(ctx.selection, ctx.metas),
        "channels": channel_hotspots(ctx.selection, ctx.metas, hidden_size(ctx.model)),
        "tensors_from": f"global top-{selection_size(glob)}",
        "tensors": tensor_hotspots(glob, ctx.sizes, ctx.metas),
    }


# ----------------------------------------------------------------------------- step

def profiles_and_clusters(ctx: AnalysisContext) -> tuple[dict, dict]:
    """Computed once per run and shared with the clustered perturbation."""
    if "clustering" not in ctx.cache:
        c = ctx.config
        profiles = tensor_profiles(ctx.scores, ctx.metas)
        ctx.cache["profiles"] = profiles
        ctx.cache["clustering"] = cluster_tensors(profiles, c.clustering_method or "kmeans",
                                                  c.n_clusters, c.dbscan_eps, c.seeds[0])
    return ctx.cache["profiles"], ctx.cache["clustering"]


def run(ctx: AnalysisContext) -> dict:
    profiles, clustering = profiles_and_clusters(ctx)
    shares = np.array([p["top_share_1pct"] for p in profiles.values()])
    names = list(profiles)
    return {"metric": ctx.config.metric, "n_tensors": len(profiles),
            "profiles": profiles,
            "heaviest_tail": names[int(np.nanargmax(shares))] if len(shares) else None,
            "clustering": clustering, "hotspots": hotspots(ctx)}


def summary_lines(section: dict) -> list[str]:
    c = section["clustering"]
    noise = f" + {c['n_noise']} noise tensors" if c.get("n_noise") else ""
    quality = f"silhouette {c['silhouette']:.3f}" if c["silhouette"] is not None else \
        f"silhouette {c['silhouette_note']}"
    lines = [f"weight analysis: {section['n_tensors']} tensors, {c['method']} -> "
             f"{c['n_clusters_found']} clusters{noise}, {quality}"]
    heavy = section["heaviest_tail"]
    if heavy:
        p = section["profiles"][heavy]
        lines.append(f"  heaviest tail: {heavy}: top 1% of weights hold "
                     f"{100 * p['top_share_1pct']:.1f}% of its score")
    for role, part in section["hotspots"]["channels"].items():
        if part["top_channels"]:
            t = part["top_channels"][0]
            lines.append(f"  hidden channel {t['channel']} {role}: {t['count']} top-K weights in "
                         f"{t['n_tensors']} tensors ({t['fold_over_uniform']:.1f}x uniform)")
    return lines
