"""Every command documented in the research guides parses with the real parsers (not run)."""
from __future__ import annotations

import re
import shlex

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
    assert config.out_dir


@pytest.mark.parametrize("guide, line", documented_lines(REPORT))
def test_report_command_parses(guide, line):
    args = parse_args(_argv(line, REPORT))
    assert report_formats(args.format)


def test_suite_commands_name_real_phases():
    lines = documented_lines(SUITE)
    assert lines
    script = (ROOT / SUITE).read_text()
    phases = re.search(r'^PHASES="([^"]+)"', script, re.M).group(1).split() + ["all"]
    for guide, line in lines:
        argv = _argv(line, SUITE)
        assert len(argv) <= 1 and (not argv or argv[0] in phases), f"{guide}: {line}"
