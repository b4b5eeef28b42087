"""Command line -> RunConfig -> pipeline.run. Exit codes: 0 ok, 1 a bug (with its traceback),
2 bad input, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP. Everything printed is redacted
(src/utils/secrets.py).

The parser is built from the fields of RunConfig and of every analysis', metric's and
perturbation's settings (each field is its own flag, src/options.py); this module only parses
and turns errors into exit codes. The
output folder is checked first, before torch and the model load, so a wrong --out-dir costs
well under a second.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from src.errors import UserError
from src.options import flag_of, options_of, placed_options, shown_default
from src.utils import output, secrets, signals


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as for every other bad input
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    from src.config import GROUP_HELP, RunConfig, settings_classes

    parser = _Parser(
        prog="phase1_runner_enhanced.py",
        description="Critical Weight Analysis: score every weight of a causal LM, rank the most "
                    "critical ones, perturb them against random-K and bottom-K controls, and "
                    "write tables, statistics and a manifest to --out-dir.")
    help_by_group = dict(GROUP_HELP)
    for settings_class in settings_classes():
        if getattr(settings_class, "GROUP_HELP", None):
            help_by_group[options_of(settings_class)[0][1].group] = settings_class.GROUP_HELP
    groups: dict[str, argparse._ArgumentGroup] = {}
    for _, field, meta in placed_options(RunConfig, settings_classes()):
        if meta.group not in groups:
            groups[meta.group] = parser.add_argument_group(meta.group,
                                                           help_by_group.get(meta.group))
        _add(groups[meta.group], field, meta)
    return parser


def _add(group, field, meta) -> None:
    default = shown_default(field)
    help_text = meta.help + (f" (default: {default})" if default else "")
    kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
    if meta.parse is None:
        group.add_argument(flag_of(field), action="store_true", **kwargs)
        return
    if meta.many:
        kwargs["nargs"] = "+"
    group.add_argument(flag_of(field), metavar=meta.metavar or field.name.upper(), **kwargs)


def check_output_first(argv: list[str] | None) -> None:
    """The output folder named on the command line, checked before anything heavy loads."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--out-dir")
    early.add_argument("--overwrite", action="store_true")
    early.add_argument("--resume", action="store_true")
    known, _ = early.parse_known_args(argv)
    if known.out_dir:
        problem = output.folder_problem(known.out_dir, replace=known.overwrite,
                                        resume=known.resume)
        if problem:
            raise UserError(problem)


def config_from_argv(argv: list[str] | None = None):
    """The validated RunConfig of a command line (UserError when anything is wrong): parsed
    (no file read), completed with the defaults read from files, then validated."""
    from src.config import RunConfig

    given = vars(build_parser().parse_args(argv))
    config = RunConfig.from_flags(given).with_file_defaults(metric_given="metric" in given)
    config.validate()
    return config


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with secrets.redacted_console(), signals.as_exceptions():
        try:
            if "-h" not in args and "--help" not in args:
                check_output_first(args)
            config = config_from_argv(args)
            from src.pipeline import run  # torch, transformers: only once the flags are good

            run(config)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted (SIGINT): weights were restored; outputs written so far are "
                  "intact", file=sys.stderr)
            return 130
        except signals.Interrupted as stop:
            print(f"{stop}: weights were restored; outputs written so far are intact",
                  file=sys.stderr)
            return stop.exit_code
        except Exception:  # a bug: its traceback, printed (redacted) as Python would, exit 1
            traceback.print_exc()
            return 1
    return 0
