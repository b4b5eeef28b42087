"""A finished run folder sent to an experiment tracker (``--report-to``): MLflow, TensorBoard or
Weights & Biases. What is sent comes from the folder (the output contract), so a single run and
every run of a study are logged the same way:

* parameters: every setting of config.json (plus a study's id, label and varying values);
* metrics: the baseline's perplexity, NLL and token accuracy; per condition ``<experiment>/
  <condition>/<value>`` (perplexity, nll, token_accuracy, delta_perplexity, ppl_ratio,
  recovery); the top-K vs random-K test (z, p, effect ratio); the mean Jaccard stability;
* artifacts: every JSON and CSV file of the folder and its plots.

Stores with no server: MLflow ``sqlite:///<folder>/mlflow.db`` (artifacts beside it in
``mlartifacts/``), TensorBoard event files under ``<folder>/tensorboard/<experiment>/<run>``,
W&B offline runs under ``<folder>/wandb`` (``WANDB_MODE`` overrides offline). The clients are the
optional extras: ``pip install '.[tracking]'``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from src.options import Settings, choice, option, text
from src.report.run_folder import RunFolder

BACKENDS = ("none", "mlflow", "tensorboard", "wandb")
PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}
CONDITION_VALUES = ("perplexity", "nll", "token_accuracy", "delta_perplexity", "ppl_ratio",
                    "recovery")
TEST_VALUES = ("z_score", "empirical_p_value", "effect_ratio", "log_ppl_ratio_to_random",
               "difference")
ARTIFACT_SUFFIXES = (".json", ".csv")


def _tracked(config) -> bool:
    return config.value("report_to") != "none"


@dataclass(frozen=True)
class TrackingSettings(Settings):
    GROUP_HELP = "a finished run logged to MLflow, TensorBoard or Weights & Biases"
    report_to: str = option("none", "send the finished run (settings, headline and per-condition "
                            "numbers, JSON, CSV and plots) to an experiment tracker: none, "
                            "mlflow, tensorboard or wandb (offline unless WANDB_MODE says "
                            "otherwise)", group="tracking", parse=choice(BACKENDS))
    tracking_uri: str | None = option(
        None, "where the tracker writes: an MLflow tracking URI, or the TensorBoard or W&B "
        "folder (default: beside --out-dir, sqlite:///<parent>/mlflow.db, <parent>/tensorboard, "
        "<parent>/wandb)", group="tracking", parse=text, used_when=("--report-to", _tracked))
    tracking_experiment: str = option(
        "critical-weight-analysis", "the MLflow experiment, W&B project or TensorBoard folder "
        "the run is logged under", group="tracking", parse=text,
        used_when=("--report-to", _tracked))

    def problems(self, config):
        missing = missing_client(self.report_to)
        return [missing] if missing else []


def missing_client(backend: str) -> str | None:
    """Why ``backend`` cannot be used here (its package is not installed), or None."""
    if backend == "none" or importlib.util.find_spec(PACKAGES[backend]) is not None:
        return None
    return (f"--report-to {backend} needs the {PACKAGES[backend]} package, which is not "
            f"installed: pip install '.[tracking]' (or pip install {PACKAGES[backend]})")


def default_location(backend: str, folder: Path) -> str:
    folder = Path(folder).resolve()
    if backend == "mlflow":
        return f"sqlite:///{folder / 'mlflow.db'}"
    return str(folder / backend)


def run_metrics(run: RunFolder) -> dict[str, float]:
    """Every headline and per-condition number of the run, by a tracker-safe name."""
    metrics = {}
    if run.perturbation:
        for key in ("perplexity", "nll", "token_accuracy"):
            metrics[f"baseline/{key}"] = run.perturbation["baseline"].get(key)
    for experiment, results in (("perturbation", run.perturbation),
                                ("quantization", run.quantization)):
        if not results:
            continue
        for row in results["conditions"]:
            name = row.get("condition") or row.get("selection")
            name = name if row.get("seed") is None else f"{name}_seed{row['seed']}"
            for key in CONDITION_VALUES:
                if key in row:
                    metrics[f"{experiment}/{name}/{key}"] = row[key]
        test = (results.get("summary") or {}).get("top_vs_random") or {}
        for key in TEST_VALUES:
            if key in test:
                metrics[f"{experiment}/top_vs_random/{key}"] = test[key]
    for family in ("across_seeds", "across_batches"):
        jaccard = ((run.stability or {}).get(family) or {}).get("jaccard") or {}
        if "mean" in jaccard:
            metrics[f"stability/{family}/jaccard_mean"] = jaccard["mean"]
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run_params(run: RunFolder, extra: dict) -> dict[str, str]:
    params = {key: json.dumps(value) if isinstance(value, (list, dict)) else str(value)
              for key, value in run.config.items()}
    params.update({key: str(value) for key, value in extra.items()})
    return params


def artifacts(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix in ARTIFACT_SUFFIXES and p.is_file())
    return files + list(RunFolder.read(folder).plots)


def report(backend: str, folder: Path, *, location: str, experiment: str, run_name: str,
           group: str | None = None, extra: dict | None = None) -> str:
    """Log the run in ``folder``; returns where it went (a line for the console)."""
    run = RunFolder.read(folder)
    params, metrics = run_params(run, extra or {}), run_metrics(run)
    files = artifacts(Path(folder))
    log = {"mlflow": _mlflow, "tensorboard": _tensorboard, "wandb": _wandb}[backend]
    return log(location, experiment, run_name, group, params, metrics, files)


def _mlflow(location, experiment, run_name, group, params, metrics, files) -> str:
    import logging

    import mlflow
    from mlflow import MlflowClient

    for name in ("mlflow", "alembic"):  # "creating database tables ..." on every new store
        logging.getLogger(name).setLevel(logging.WARNING)

    client = MlflowClient(tracking_uri=location)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        store = Path(location.removeprefix("sqlite:///")).parent / "mlartifacts"
        experiment_id = client.create_experiment(
            experiment, artifact_location=store.as_uri() if location.startswith("sqlite:///")
            else None)
    else:
        experiment_id = found.experiment_id
    tags = {"mlflow.runName": run_name, **({"study": group} if group else {})}
    tracked = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = tracked.info.run_id
    entities = mlflow.entities
    client.log_batch(run_id, params=[entities.Param(k, v[:6000]) for k, v in params.items()],
                     metrics=[entities.Metric(k, v, 0, 0) for k, v in metrics.items()])
    for path in files:
        client.log_artifact(run_id, str(path), "plots" if path.parent.name == "plots" else None)
    client.set_terminated(run_id)
    return f"mlflow run {run_id} in experiment '{experiment}' ({location})"


def _tensorboard(location, experiment, run_name, group, params, metrics, files) -> str:
    from matplotlib.image import imread
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(location) / experiment / run_name.replace("/", "_")  # labels may hold paths
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        for name, value in metrics.items():
            writer.add_scalar(name, value, 0)
        for path in files:
            if path.suffix == ".png":
                image = imread(path)[..., :3]
                writer.add_image(f"plots/{path.stem}", image, 0, dataformats="HWC")
            elif path.stat().st_size <= 1 << 20:
                writer.add_text(f"files/{path.name}", "    " + path.read_text(
                    encoding="utf-8").replace("\n", "\n    "))
    return f"tensorboard events in {log_dir}"


def _wandb(location, experiment, run_name, group, params, metrics, files) -> str:
    import wandb

    Path(location).mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("WANDB_MODE", "offline")
    run = wandb.init(project=experiment, group=group, name=run_name, dir=location, mode=mode,
                     config=params, reinit="create_new")
    try:
        run.summary.update(metrics)
        for path in files:
            run.save(str(path), base_path=str(path.parent.parent if path.parent.name == "plots"
                                              else path.parent), policy="now")
    finally:
        run.finish()
    return f"wandb run {run.id} ({mode}, {location})"
