"""``python -m src.study plan|status|run|report STUDY.yaml`` (or scripts/run_study.py).

plan    validate every run (nothing runs, nothing is written) and list the runs with their state
status  the runs by state: done, running, failed, pending
run     execute what is not done (pending runs, cut-short runs resumed; --retry-failed: failed
        runs too), then write study.csv, study.parquet and the report
report  write study.csv, study.parquet and the report of the runs done so far

Exit status: 0 when every run is done, 1 when some failed or are still pending or running
elsewhere, 2 on bad input, 130/143 when interrupted.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

from src.errors import UserError
from src.report import tracking
from src.study import aggregate, execute, report as study_report, slurm, spec
from src.study.state import STATES, StudyFolder
from src.utils import secrets, signals
from src.utils.io import write_json, write_text
from src.utils.output import location_problem

EXECUTORS = ("local", "torchrun", "slurm", "submitit-local")
EXECUTOR_SETTINGS = ("jobs", "nproc", "partition", "gpus_per_job", "cpus_per_job", "time",
                     "account", "parallelism")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m src.study", description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("plan", "status", "run", "report"))
    parser.add_argument("study_file", help="the study's YAML file")
    parser.add_argument("--out", help="the study folder (default results/studies/<name>)")
    parser.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                        help="override a base setting of every run (a YAML value), e.g. --set "
                             "model=gpt2 --set max-samples=8; not an axis of the study")
    group = parser.add_argument_group("execution (defaults from the study file's executor:)")
    group.add_argument("--executor", choices=EXECUTORS,
                       help="local (default), torchrun, slurm, or submitit-local (submitit's "
                            "job arrays as local processes)")
    group.add_argument("--jobs", type=int, help="local: runs at once (one GPU each where there "
                       "are GPUs; default 1)")
    group.add_argument("--nproc", type=int, help="torchrun: processes per run (default 2); "
                       "slurm: N > 1 runs each job's run under torchrun with N processes")
    group.add_argument("--partition", help="slurm partition")
    group.add_argument("--gpus-per-job", type=int, help="slurm: GPUs per run")
    group.add_argument("--cpus-per-job", type=int, help="slurm: CPUs per run (default 4)")
    group.add_argument("--time", type=int, help="slurm: time limit per run in minutes "
                       "(default 60); a job that reaches it is requeued and resumes")
    group.add_argument("--account", help="slurm account")
    group.add_argument("--parallelism", type=int, help="slurm: jobs of an array at once")
    group.add_argument("--retry-failed", action="store_true", help="run failed runs again "
                       "(resumed where they stopped)")
    group.add_argument("--report-to", choices=tracking.BACKENDS, default="none",
                       help="log every finished run to a tracker, the study as its "
                            "experiment/group (default none)")
    group.add_argument("--tracking-uri", help="MLflow URI or TensorBoard/W&B folder (default "
                       "in the study folder)")
    return parser


def executor_settings(study: spec.Study, args) -> dict:
    settings = dict(study.executor)
    unknown = sorted(set(settings) - set(EXECUTOR_SETTINGS) - {"kind"})
    if unknown:
        raise UserError(f"study file: unknown executor setting '{unknown[0]}'; use kind, "
                        f"{', '.join(EXECUTOR_SETTINGS)}")
    for name in EXECUTOR_SETTINGS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    settings["kind"] = args.executor or settings.get("kind", "local")
    if settings["kind"] not in EXECUTORS:
        raise UserError(f"study file: unknown executor kind '{settings['kind']}'; use "
                        f"{', '.join(EXECUTORS)}")
    for name in ("jobs", "nproc"):
        if int(settings.get(name, 1)) < 1:
            raise UserError(f"executor {name} must be at least 1")
    return settings


def check_executor_here(settings: dict) -> None:
    """The chosen engine exists on this machine (UserError if not)."""
    if settings["kind"] == "slurm" and shutil.which("sbatch") is None:
        raise UserError("the slurm executor needs Slurm (no sbatch on this machine's PATH): run "
                        "the study from a Slurm login node, or use --executor local, torchrun or "
                        "submitit-local")


def states_of(folder: StudyFolder, study: spec.Study) -> dict[str, str]:
    return {run.id: folder.state(run.id) for run in study.runs}


def print_runs(study: spec.Study, folder: StudyFolder, states: dict[str, str]) -> None:
    counts = Counter(states.values())
    print(f"study {study.name}: {len(study.runs)} runs in {folder.root} ("
          + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATES) + ")")
    for run in study.runs:
        code = folder.last_exit(run.id)
        note = f" (exit {code}, log {folder.log(run.id)})" if states[run.id] == "failed" else ""
        print(f"  {run.id}  {states[run.id]:<8} {run.label}{note}")


def run_study(study: spec.Study, folder: StudyFolder, settings: dict, args) -> None:
    folder.runs.mkdir(parents=True, exist_ok=True)
    write_text(folder.root / "study.yaml", study.source)
    write_json(folder.root / "plan.json", [
        {"id": r.id, "label": r.label, "varying": r.varying, "command": r.argv()}
        for r in study.runs])
    kind = settings["kind"]
    launcher = execute.launcher(kind, int(settings.get("nproc", 2 if kind == "torchrun" else 1)))
    scorer_of = execute.scorers(study.runs)
    sharing = {scorer for scorer, n in Counter(scorer_of.values()).items() if n > 1}
    tracker = _tracker(study, folder, args)
    wanted = {"pending"} | ({"failed"} if args.retry_failed else set())

    def finished(run_id: str, code) -> None:
        state = folder.state(run_id)
        print(f"[study] {run_id} {study.run(run_id).label}: {state}"
              + (f" (exit {code}, log {folder.log(run_id)})" if state == "failed" else ""),
              flush=True)
        tracker(run_id)

    log_finished(study, folder, tracker)
    for wave in execute.waves(study.runs):
        execute.wait_for_scorers(folder, wave, scorer_of)
        todo = [run for run in wave if folder.state(run.id) in wanted]
        if not todo:
            continue
        for run in todo:
            execute.prepare(folder, run, scorer_of, sharing)
        print(f"[study] {len(todo)} run(s) to execute ({kind})", flush=True)
        ids = [run.id for run in todo]
        if kind in slurm.SUBMITIT_KINDS:
            slurm.run_array(folder.root, ids, launcher, [], kind, settings, finished)
        else:
            execute.run_local(str(folder.root), ids, launcher, [],
                              int(settings.get("jobs", 1)), finished)
    elsewhere = [run.id for run in study.runs if folder.state(run.id) == "running"]
    if elsewhere:  # another study process runs them: the aggregate waits for them
        print(f"[study] waiting for {len(elsewhere)} run(s) running in another process: "
              f"{', '.join(elsewhere)}", flush=True)
        execute.wait_for(folder, elsewhere)


def log_finished(study: spec.Study, folder: StudyFolder, tracker) -> None:
    """Send every done run that the tracker has not seen (finished while the study was cut
    short, or before --report-to was asked for)."""
    for run in study.runs:
        if folder.state(run.id) == "done":
            tracker(run.id)


def _tracker(study: spec.Study, folder: StudyFolder, args):
    """run id -> logs the done run once (a marker file remembers it)."""
    if args.report_to == "none":
        return lambda run_id: None
    location = args.tracking_uri or tracking.default_location(args.report_to, folder.root)

    def log(run_id: str) -> None:
        marker = folder.runs / f"{run_id}.tracked-{args.report_to}"
        if folder.state(run_id) != "done" or marker.is_file():
            return
        planned = study.run(run_id)
        where = tracking.report(args.report_to, folder.run_dir(run_id), location=location,
                                experiment=study.name, run_name=f"{planned.label} [{run_id}]",
                                group=study.name, extra={"study": study.name, "run_id": run_id,
                                                         "label": planned.label})
        write_text(marker, where + "\n")
    return log


def aggregate_and_report(study: spec.Study, folder: StudyFolder) -> None:
    table = aggregate.study_table(folder, study.runs)
    if table.empty:
        print("[study] no run is done yet: no table or report")
        return
    paths = aggregate.write_table(folder, table)
    counts = Counter(states_of(folder, study).values())
    paths += study_report.write_report(folder.root, study.name, study.axes,
                                       {s: counts.get(s, 0) for s in STATES}, table)
    print("[study] wrote " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    with secrets.redacted_console(), signals.as_exceptions():
        try:
            return _main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("study interrupted (SIGINT): finished runs are kept; run it again to resume",
                  file=sys.stderr)
            return 130
        except signals.Interrupted as stop:
            print(f"study {stop}: finished runs are kept; run it again to resume",
                  file=sys.stderr)
            return stop.exit_code


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    study = spec.load(args.study_file, args.set)
    root = Path(args.out or Path("results") / "studies" / study.name)
    problem = location_problem(str(root))
    if problem:
        raise UserError(f"--out {problem}")
    folder = StudyFolder(root)
    settings = executor_settings(study, args)
    if args.command == "run":
        check_executor_here(settings)
    missing = tracking.missing_client(args.report_to)
    if missing:
        raise UserError(missing)
    spec.validate(study, root)
    if args.command == "run":
        run_study(study, folder, settings, args)
    if args.command == "report":
        log_finished(study, folder, _tracker(study, folder, args))
    if args.command in ("run", "report"):
        aggregate_and_report(study, folder)
    states = states_of(folder, study)
    print_runs(study, folder, states)
    return 0 if all(state == "done" for state in states.values()) else 1
