"""The code's shape: no import cycle among src/ modules, no oversized module, every analysis one
registry entry with everything the tool needs from it."""
from __future__ import annotations

import ast
import dataclasses
from types import SimpleNamespace

from src.distributed.ranks import Ranks
from src.analysis import registry
from src.options import options_of
from tests.conftest import ROOT

MAX_LINES = 400


def _module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _src_modules() -> dict[str, object]:
    return {_module_name(p): p for p in (ROOT / "src").rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the src modules it imports (at any level of the file, functions included)."""
    modules = _src_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_among_src_modules():
    graph = import_graph()
    assert graph["src.pipeline"] >= {"src.config", "src.analysis.registry"}  # the walk sees edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """src package (or top-level module) -> the other src packages its modules import."""
    package = lambda module: ".".join(module.split(".")[:2])  # noqa: E731
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(package(module), set())
        edges |= {package(t) for t in targets} - {package(module)}
    return packages


def test_packages_are_layered_without_loops():
    """A package imports only packages below it: no two packages import each other, directly or
    through others (utils, distributed, plots at the bottom; pipeline and cli at the top)."""
    packages = package_graph(import_graph())
    assert "src.distributed" in packages["src.sensitivity"]  # the walk sees package edges
    cycle = find_cycle(packages)
    assert cycle is None, " -> ".join(cycle)
    assert packages["src.utils"] <= {"src.errors"} and packages["src.distributed"] <= {"src.errors"}
    assert packages["src.plots"] <= {"src.errors", "src.utils", "src.models"}


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_oversized():
    for folder in ("src", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            n_lines = len(path.read_text(encoding="utf-8").splitlines())
            assert n_lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {n_lines} lines"


def test_every_analysis_is_one_complete_registry_entry():
    analyses = registry.load()
    assert list(analyses) == ["targeting", "weight_analysis", "metric_correlation",
                              "architecture", "temporal_stability", "progressive_perturbation",
                              "clustered_perturbation", "targeted_perturbation", "super_weights",
                              "faithfulness", "fault_injection", "bit_search", "mediation"]
    flags = set()
    for key, analysis in analyses.items():
        assert callable(analysis.run) and callable(analysis.enabled) and callable(analysis.summary)
        for settings_class in analysis.settings:
            assert dataclasses.is_dataclass(settings_class) and options_of(settings_class)
            flags |= {f.name for f, _ in options_of(settings_class)}
        defaults = SimpleNamespace(**{
            f.name: f.default for cls in analysis.settings for f in dataclasses.fields(cls)},
            perturb=None, target_components=(), target_layers=None, layers=None,
            stability_fraction=0.5, stability_batches=3, max_length=256, max_samples=16,
            quant_group=128, quant_symmetric=False, bit_position=None)
        assert analysis.enabled(defaults) is False, f"{key} runs although no flag asked for it"
    from src.config import RunConfig
    core = {f.name for f in dataclasses.fields(RunConfig)}
    assert not flags & core, "an analysis flag shadows a core flag"
    assert sum(len(a.plots) for a in analyses.values()) == 11
    assert sum(a.findings is not None for a in analyses.values()) == 12  # targeting: none


def test_metric_and_perturbation_settings_are_flags_config_keys_and_job_settings(tmp_path):
    """A metric's or perturbation's options are one settings dataclass declared next to it and
    named in its registration: flags, RunConfig values, config.json keys (where config.json has
    always had them), the ScoringJob's settings and the stored scores' options."""
    from src import steps
    from src.cli import build_parser, config_from_argv
    from src.config import RunConfig, settings_classes
    from src.sensitivity import score_store
    from src.sensitivity.hutchinson import HutchinsonSettings
    from src.sensitivity.metrics import METRICS
    from src.sensitivity.perturb import PERTURBATIONS, PerturbOptions

    assert METRICS["hutchinson_diag"].settings is HutchinsonSettings
    assert PERTURBATIONS["bit_flip"].settings is PERTURBATIONS["gauss_noise"].settings is \
        PerturbOptions
    assert {HutchinsonSettings, PerturbOptions} <= set(settings_classes())
    config = config_from_argv(["--metric", "hutchinson_diag", "--hutchinson-samples", "3",
                               "--perturb", "bit_flip", "--bit-position", "sign",
                               "--out-dir", str(tmp_path / "run")])
    moved = ["hutchinson_samples", "hutchinson_block", "perturb_scale", "bit_position",
             "perturb_prob"]
    core = {f.name for f in dataclasses.fields(RunConfig)}
    help_text = build_parser().format_help()
    for name in moved:
        assert name not in core and f"--{name.replace('_', '-')}" in help_text
    keys = list(config.to_dict())
    assert keys[keys.index("save_scores"):keys.index("seeds") + 1] == [
        "save_scores", moved[0], "hutchinson_rel_stderr", "hutchinson_max_samples", moved[1],
        "hutchinson_hvp", "hutchinson_moments", "perturb", "controls", *moved[2:], "seeds"]
    assert config.value("bit_position") == "sign"
    job = steps.scoring_job(config, model=None, params={}, blocks=None, ranks=Ranks())
    assert job.settings[HutchinsonSettings] == HutchinsonSettings(hutchinson_samples=3)
    meta = score_store.describe("hutchinson_diag", job, "model", {"sha256": "data"}, 0.0)
    assert meta["options"] == {"seed": 0, "batch_size": 4, "hutchinson_samples": 3,
                               "hutchinson_block": False,
                               "hutchinson_hvp": "double_backward",  # auto, decided per job
                               "hutchinson_rel_stderr": None,  # unused with a fixed number
                               "hutchinson_max_samples": None}
    default = dataclasses.replace(job, settings={})
    assert score_store.mismatch(meta, "hutchinson_diag", default, "model") == \
        "they were scored with hutchinson_samples=3, this run has 8"
