"""Every command documented in the research guides parses with the real parsers (not run)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from src.cli import config_from_argv
from src.report.build import parse_args, report_formats
from tests.conftest import ROOT

GUIDES = ("RESEARCH_TESTING_GUIDE.md", "QUICK_RESEARCH_COMMANDS.md")
RUNNER = "python phase1_runner_enhanced.py"
REPORT = "python scripts/generate_research_report.py"
SUITE = "scripts/run_research_tests.sh"
ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)+")


def documented_lines(marker: str) -> list[tuple[str, str]]:
    """(guide, command line) for every line of a fenced code block invoking ``marker``;
    backslash continuations joined, leading VAR=value assignments dropped."""
    found = []
    for guide in GUIDES:
        text = (ROOT / guide).read_text(encoding="utf-8").replace("\\\n", " ")
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S):
            for line in block.splitlines():
                line = ENV_PREFIX.sub("", line.strip().removeprefix("$ "))
                if line.startswith(marker):
                    found.append((guide, line))
    return found


def _argv(line: str, marker: str) -> list[str]:
    return shlex.split(line[len(marker):], comments=True)




def test_guides_document_enough_commands():
    for guide in GUIDES:
        assert (ROOT / guide).is_file(), guide
    runner = documented_lines(RUNNER)
    assert {g for g, _ in runner} == set(GUIDES)
    assert len(runner) >= 20


TEXT_FILE_FLAGS = ("--data-file", "--conditions-data")
FOLDER_FLAGS = ("--lm-eval-include",)


@pytest.mark.parametrize("guide, line", documented_lines(RUNNER))
def test_runner_command_parses(guide, line, tmp_path, monkeypatch):
    argv = _argv(line, RUNNER)
    monkeypatch.chdir(tmp_path)  # the user's own text files, as the command names them
    for flag, value in zip(argv, argv[1:]):
        if flag in TEXT_FILE_FLAGS:
            (tmp_path / value).write_text("Some text of the user's own.\n")
        if flag in FOLDER_FLAGS:
            (tmp_path / value).mkdir(parents=True, exist_ok=True)
    config = config_from_argv(argv)  # parsed and validated as the CLI does
    assert given_values(argv) == {name: config.value(name) for name in given_values(argv)}
    named = dict(zip(argv, argv[1:])).get("--out-dir")
    assert config.out_dir == named if named else DEFAULT_OUT_DIR.fullmatch(config.out_dir)


DEFAULT_OUT_DIR = re.compile(r"results/[\w.-]+_[a-z_]+_k\d+_\d{8}_\d{6}")


def given_values(argv: list[str]) -> dict:
    """Setting name -> the value each flag of ``argv`` means on its own (its own parser; a
    switch is True): what the parsed configuration must hold for every flag given."""
    from src.config import RunConfig, settings_classes
    from src.options import flag_of, options_of

    by_flag = {flag_of(f): (f, meta) for cls in (RunConfig, *settings_classes())
               for f, meta in options_of(cls)}
    values = {}
    for position, arg in enumerate(argv):
        if arg not in by_flag:
            continue
        field, meta = by_flag[arg]
        values[field.name] = True if meta.parse is None else \
            meta.parse(argv[position + 1], arg)
    return values


def readme_first_command() -> list[str]:
    """The arguments of the README's first command (the quick start)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if RUNNER in line)
    return _argv(line[line.index(RUNNER):], RUNNER)


def test_readme_first_command_means_what_the_readme_says(tmp_path, monkeypatch):
    """README: "scores every weight matrix with grad_x_weight, ranks the global top-10, zeroes
    them and the same number of random-K (seeds 0, 1, 2) and bottom-K control weights" on the
    built-in model, offline; "Results land in results/<model>_<metric>_k<K>_<time>/"."""
    from src.models.builtin import BUILTIN_NAME

    monkeypatch.chdir(tmp_path)
    config = config_from_argv(readme_first_command())
    assert (config.metric, config.topk, config.mode, config.perturb) == \
        ("grad_x_weight", 10, "global", "zero")
    assert config.model == BUILTIN_NAME and config.revision is None
    assert config.controls == ("random_k", "bottom_k") and config.seeds == (0, 1, 2)
    assert (config.layers, config.target_layers, config.target_components,
            config.include_embeddings) == (None, None, (), False)  # every weight matrix
    assert (config.data_file, config.dataset, config.scores_from) == (None, None, None)
    assert not (config.overwrite or config.resume or config.stability_check or config.shard)
    assert config.quantize is None and config.downstream_tasks == () == config.lm_eval_tasks
    assert re.fullmatch(rf"results/{BUILTIN_NAME}_grad_x_weight_k10_\d{{8}}_\d{{6}}",
                        config.out_dir)


@pytest.mark.parametrize("guide, line", documented_lines(REPORT))
def test_report_command_parses(guide, line):
    args = parse_args(_argv(line, REPORT))
    assert report_formats(args.format)


STUDY = "python -m src.study"


def study_lines() -> list[tuple[str, str]]:
    """Documented study commands of the guides and of the README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [("README.md", line.strip()) for block in
             re.findall(r"^```bash\n(.*?)^```", readme, re.M | re.S)
             for line in block.splitlines() if line.strip().startswith(STUDY)]
    return documented_lines(STUDY) + lines


def test_guides_and_readme_document_study_commands():
    assert {guide for guide, _ in study_lines()} >= {"README.md", "QUICK_RESEARCH_COMMANDS.md"}


@pytest.mark.parametrize("guide, line", study_lines())
def test_study_command_parses_and_its_study_validates(guide, line, tmp_path):
    from src.study import spec
    from src.study.cli import build_parser, executor_settings

    args = build_parser().parse_args(_argv(line, STUDY))
    study = spec.load(str(ROOT / args.study_file), args.set)
    executor_settings(study, args)
    spec.validate(study, tmp_path)


def test_suite_commands_name_real_phases():
    lines = documented_lines(SUITE)
    assert lines
    script = (ROOT / SUITE).read_text()
    phases = re.search(r'^PHASES="([^"]+)"', script, re.M).group(1).split() + ["all"]
    for guide, line in lines:
        argv = _argv(line, SUITE)
        assert len(argv) <= 1 and (not argv or argv[0] in phases), f"{guide}: {line}"


ADDED_METRIC_CHECK = r"""
import sys, pathlib, torch
import src.sensitivity
src.sensitivity.__path__.append(sys.argv[1])  # the README's power.py, as if it were in src/
import src.sensitivity.power
from src.cli import config_from_argv
from src.errors import UserError
from src.models.loader import load_model
from src.distributed.ranks import Ranks
from src.sensitivity.eligibility import eligible_parameters
from src.sensitivity.metrics import compute_scores
from src import steps
config = config_from_argv(["--model", "random:tiny-gpt2", "--metric", "power",
                           "--power-exponent", "3", "--out-dir", sys.argv[1] + "/out"])
assert config.to_dict()["power_exponent"] == 3.0
try:
    config_from_argv(["--power-exponent", "3", "--out-dir", sys.argv[1] + "/other"])
    raise SystemExit("--power-exponent without --metric power was accepted")
except UserError as error:
    assert "power-exponent" in str(error)
model = load_model("random:tiny-gpt2", dtype="float32", device="cpu")[0]
params = eligible_parameters(model)
job = steps.scoring_job(config, model, params, None, Ranks())
scores = compute_scores(job, "power").scores
for name, p in params.items():
    torch.testing.assert_close(scores[name], p.detach().abs() ** 3)
print("ok")
"""


def test_readme_metric_example_is_one_working_file(tmp_path):
    """The developer notes' example metric, saved as the one file it says it is, gives a flag,
    a config.json key, a refusal without its metric, and its scores."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    notes = readme[readme.index("### Developer notes: adding a metric"):]
    code = re.search(r"^```python\n(.*?)^```", notes, re.M | re.S).group(1)
    (tmp_path / "power.py").write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", ADDED_METRIC_CHECK, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
