"""Sensitivity profiles of weight tensors and their clustering (--weight-analysis and the
clustered perturbation share both, computed once per run).

Every number is about |score| of the run's metric. Profile of one tensor: mean, std, min, max,
quantiles p50..p99.9 (sampled on large tensors), ``top_share_0.01pct`` / ``top_share_1pct`` =
share of the tensor's total |score| held by its top 0.01% / 1% of weights (at least one weight),
and ``kurtosis`` (plain, 3 = Gaussian); see src/sensitivity/statistics.py.

Clustering features (standardised to zero mean / unit variance before clustering): log10 mean,
log10(p99/p50), log10(max/p99), both top shares, log10 kurtosis. ``kmeans`` uses
--n-clusters. ``dbscan`` uses min_samples = 3 and, unless --dbscan-eps is given, eps = the 90th
percentile of each tensor's distance to its 2nd nearest other tensor (so about 90% of tensors
are core points). Noise tensors get label -1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from src.analysis.context import AnalysisContext
from src.errors import UserError
from src.models.components import ParamMeta
from src.options import Settings, choice, integer, number, option
from src.sensitivity.statistics import tensor_statistics

FEATURES = ["log10_mean", "log10_p99_over_p50", "log10_max_over_p99", "top_share_0.01pct",
            "top_share_1pct", "log10_kurtosis"]
DBSCAN_MIN_SAMPLES = 3
TINY = 1e-30  # keeps logs of ratios finite when a quantile is exactly 0
GROUP = "advanced analysis"


def _clustering_used(config) -> bool:
    return config.analysis_enabled("weight_analysis") or \
        config.analysis_enabled("clustered_perturbation")


@dataclass(frozen=True)
class ClusteringSettings(Settings):
    clustering_method: str = option(
        "kmeans", "how tensors are clustered by profile: kmeans or dbscan", group=GROUP,
        parse=choice(("kmeans", "dbscan")),
        used_when=("--weight-analysis or --advanced-perturbations clustered", _clustering_used))
    n_clusters: int = option(
        4, "kmeans: number of clusters", group=GROUP, parse=integer(2),
        used_when=("--clustering-method kmeans with --weight-analysis or clustered",
                   lambda c: _clustering_used(c) and c.value("clustering_method") == "kmeans"))
    dbscan_eps: float | None = option(
        None, "dbscan: neighbourhood radius in standardised feature units (default: 90th "
        "percentile of the 2nd-nearest-tensor distance)", group=GROUP,
        parse=number(0.0, low_open=True),
        used_when=("--clustering-method dbscan",
                   lambda c: _clustering_used(c) and c.value("clustering_method") == "dbscan"))


def check_clusterable(settings, preflight) -> None:
    """Before the run: enough scored tensors for the clustering asked for."""
    n_tensors = len(preflight.params)
    if n_tensors < 2:
        raise UserError(f"clustering needs at least 2 scored tensors (this run scores "
                        f"{n_tensors})")
    if settings.clustering_method == "kmeans" and settings.n_clusters > n_tensors:
        raise UserError(f"--n-clusters {settings.n_clusters} exceeds the {n_tensors} scored "
                        f"tensors")


# ----------------------------------------------------------------------------- profiles

def tensor_profiles(scores, metas: dict[str, ParamMeta], seed: int = 0,
                    layout=None) -> dict[str, dict]:
    """name -> {layer, component, numel, statistics of |score| with the tail measures};
    ``layout`` (sharding.Layout) when ``scores`` are this rank's rows."""
    stats = tensor_statistics(scores, absolute=True, tail=True, seed=seed, layout=layout)
    return {name: {"layer": metas[name].layer, "component": metas[name].component,
                   "numel": layout.numel[name] if layout else scores[name].numel(), **values}
            for name, values in stats.items()}


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

def _kmeans(x: np.ndarray, settings, seed: int):
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=settings.n_clusters, n_init=10, random_state=seed).fit(x)
    return model.labels_, {"n_clusters": settings.n_clusters, "inertia": float(model.inertia_)}


def _dbscan(x: np.ndarray, settings, seed: int):
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    min_samples = min(DBSCAN_MIN_SAMPLES, len(x))
    eps, chosen = settings.dbscan_eps, "given"
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


def cluster_tensors(profiles: dict[str, dict], settings, seed: int = 0) -> dict:
    """Cluster tensors by standardised profile features; labels and one summary per cluster."""
    from sklearn.preprocessing import StandardScaler

    raw = profile_features(profiles)
    x = StandardScaler().fit_transform(raw)
    labels, details = CLUSTERERS[settings.clustering_method](x, settings, seed)
    names = list(profiles)
    clusters = {}
    for label in sorted(set(labels.tolist())):
        members = [n for n, lab in zip(names, labels) if lab == label]
        rows = labels == label
        clusters[str(label)] = {
            "n_tensors": len(members), "tensors": members,
            "components": _counts(profiles[n]["component"] for n in members),
            "layers": sorted({profiles[n]["layer"] for n in members
                              if profiles[n]["layer"] is not None}),
            "mean_features": dict(zip(FEATURES, raw[rows].mean(axis=0).round(6).tolist())),
            "n_weights": int(sum(profiles[n]["numel"] for n in members)),
        }
    score = silhouette(x, labels)
    n_found = len(set(labels.tolist()) - {-1})
    return {"method": settings.clustering_method, **details, "features": FEATURES,
            "standardised": True, "n_clusters_found": n_found, "silhouette": score,
            "silhouette_note": None if score is not None else
            f"undefined: {n_found} cluster(s) besides noise (needs 2 or more)",
            "labels": dict(zip(names, labels.tolist())), "clusters": clusters}


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profiles_and_clusters(ctx: AnalysisContext) -> tuple[dict, dict]:
    """Computed once per run and shared by the weight analysis and the clustered perturbation."""
    if "clustering" not in ctx.cache:
        profiles = tensor_profiles(ctx.scores, ctx.metas, layout=ctx.layout)
        ctx.cache["profiles"] = profiles
        ctx.cache["clustering"] = cluster_tensors(profiles, ctx.settings, ctx.seeds[0])
    return ctx.cache["profiles"], ctx.cache["clustering"]
