"""Executing a study's runs: one run (``execute``, what every executor calls, in whatever
process), the order (``waves``: runs that share a scoring wait for the run that computes it),
and the ``local`` executor (sequential or ``--jobs N`` processes, one GPU each).

A run is the real CLI in a child process (phase1_runner_enhanced.py, or under torchrun), its
console in ``runs/<id>.log``. The child gets SIGTERM when the process that started it dies
(Linux ``PR_SET_PDEATHSIG``), so a killed study leaves no orphan: the run records itself as
interrupted and the next ``run`` resumes it with ``--resume``, keeping every finished condition.

Scoring is shared: runs with the same scoring key (model, text, blocks, metric and the
settings that change its scores, scored set) form a group; the group's first run computes the
scores (``--save-scores``) in the first wave, the others read them (``--scores-from``) in the
second. A run's command is decided when it first starts and kept (``runs/<id>.argv.json``), so a
resumed run is continued with exactly the command it began with.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from src.study.state import StudyFolder
from src.utils.io import write_json, write_text

RUNNER = Path(__file__).resolve().parents[2] / "phase1_runner_enhanced.py"
# The settings that decide a metric's scores besides the metric's own flags.
SCORING_FIELDS = ("model", "revision", "dtype", "device", "device_map", "shard", "data_file",
                  "dataset", "max_length", "max_samples", "batch_size", "metric", "layers",
                  "target_layers", "target_components", "include_embeddings",
                  "scores_from_other_data")


def scoring_key(config) -> str | None:
    """Runs with the same key compute the same scores (None: the run brings its own scores, or
    computes data-free ones, e.g. magnitude, faster than another run could hand them over)."""
    from src.sensitivity.metrics import METRICS

    if config.scores_from or not METRICS[config.metric].uses_data:
        return None
    values = {name: config.value(name) for name in SCORING_FIELDS}
    for metric in METRICS.values():
        if metric.settings is not None:
            values.update({name: str(value) for name, value in
                           vars(config.settings(metric.settings)).items()})
    return json.dumps(values, sort_keys=True, default=str)


def scorers(runs) -> dict[str, str]:
    """run id -> the id of the run that computes its scores (itself for the first of a group)."""
    first_by_key, scorer_of = {}, {}
    for run in runs:
        key = scoring_key(run.config)
        scorer_of[run.id] = first_by_key.setdefault(key, run.id) if key else run.id
    return scorer_of


def wait_for_scorers(folder: StudyFolder, wave, scorer_of: dict[str, str]) -> None:
    """Until no scorer of ``wave`` runs in another process (whose scores the wave would miss)."""
    wait_for(folder, [scorer_of[run.id] for run in wave])


def wait_for(folder: StudyFolder, run_ids: list[str], poll_seconds: float = 1.0) -> None:
    """Until none of ``run_ids`` is running (in another process)."""
    while any(folder.state(run_id) == "running" for run_id in run_ids):
        time.sleep(poll_seconds)


def waves(runs) -> list[list]:
    """[the runs that score (or need no shared scores)], [the runs that read them]."""
    scorer_of = scorers(runs)
    first = [run for run in runs if scorer_of[run.id] == run.id]
    second = [run for run in runs if scorer_of[run.id] != run.id]
    return [wave for wave in (first, second) if wave]


def prepare(folder: StudyFolder, run, scorer_of: dict[str, str], sharing: set[str]) -> None:
    """Decide and keep the command of a run that has none yet (under its lock: two study
    processes never decide it differently)."""
    with folder.claimed(run.id) as mine:
        if mine and not folder.argv_file(run.id).is_file():
            _decide(folder, run, scorer_of, sharing)


def _decide(folder: StudyFolder, run, scorer_of: dict[str, str], sharing: set[str]) -> None:
    argv = run.argv() + ["--out-dir", str(folder.run_dir(run.id))]
    scorer = scorer_of[run.id]
    if scorer != run.id and folder.state(scorer) == "done":
        argv += ["--scores-from", str(folder.run_dir(scorer))]
        if "metric" not in run.flags:  # the default metric, said out loud (not read from them)
            argv += ["--metric", run.config.metric]
    elif run.id in sharing and not run.config.save_scores:
        argv.append("--save-scores")
    folder.runs.mkdir(parents=True, exist_ok=True)
    write_json(folder.argv_file(run.id), argv)


def execute(root: str, run_id: str, launcher: list[str], extra: list[str] | None = None,
            env: dict | None = None) -> int | None:
    """Run (or resume) one prepared run unless another process holds it or it is done.
    Returns the child's exit status, None when nothing was started."""
    folder = StudyFolder(root)
    with folder.claimed(run_id) as mine:
        if not mine or folder.state(run_id) == "done":
            return None
        argv = json.loads(folder.argv_file(run_id).read_text())
        if folder.has_partial_run(run_id):
            argv.append("--resume")
        elif folder.has_leftovers(run_id):
            argv.append("--overwrite")
        argv += extra or []
        command = [*(launcher or [WARM]), str(RUNNER), *argv]
        folder.exit_file(run_id).unlink(missing_ok=True)  # this attempt's status replaces it
        with open(folder.log(run_id), "a", encoding="utf-8") as log:
            log.write(f"=== {' '.join(command)}\n")
        if launcher:
            with open(folder.log(run_id), "a", encoding="utf-8") as log:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      preexec_fn=die_with_parent).returncode
        else:
            code = _run_warm(argv, folder.log(run_id), env)
        write_text(folder.exit_file(run_id), f"{code}\n")
        return code


def die_with_parent() -> None:
    """In the child: SIGTERM when the thread that started it (its process) dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# Runs on one machine start from a fork server that has imported the tool, torch and the
# transformers model code once: a process that imports them costs 5-10 s, which is most of a
# small run. Each run is still its own process (its memory, its signals, its exit status).
WARM = "(forked)"
WARM_MODULES = ["src.study.warm"]
_FORKS = None


def start_fork_server():
    """The fork server, started from the study's main thread (it dies with the thread that
    starts it, and its runs with it)."""
    global _FORKS
    import multiprocessing.forkserver

    if _FORKS is None:
        _FORKS = multiprocessing.get_context("forkserver")
        _FORKS.set_forkserver_preload(WARM_MODULES)
    if threading.current_thread() is threading.main_thread():
        multiprocessing.forkserver.ensure_running()
    return _FORKS


def _run_warm(argv: list[str], log: Path, env: dict | None) -> int:
    child = start_fork_server().Process(target=_cli_child, args=(argv, str(log), env))
    child.start()
    child.join()
    return child.exitcode


def _cli_child(argv: list[str], log: str, env: dict | None) -> None:
    """The forked run: console into its log, dies with the fork server, the CLI's exit status."""
    die_with_parent()
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    handle = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    from src.cli import main

    raise SystemExit(main(argv))


def launcher(kind: str, nproc: int) -> list[str] | None:
    """The command in front of phase1_runner_enhanced.py: torchrun with nproc processes per
    run (torch.distributed.run is torchrun's module), python, or None (local): a process
    forked from the warm fork server."""
    if kind == "torchrun" or (kind != "local" and nproc > 1):  # (a Slurm job with N GPUs)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}"]
    return None if kind == "local" else [sys.executable]  # a Slurm job runs one run: no server


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_local(root: str, run_ids: list[str], launcher_: list[str], extra: list[str], jobs: int,
              on_finish) -> None:
    """``jobs`` runs at a time, each child on its own GPU (CUDA_VISIBLE_DEVICES) where there are
    GPUs; ``on_finish(run_id, exit_status)`` after each."""
    gpus = gpu_count()
    slots: queue.Queue = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)

    def one(run_id: str) -> None:
        slot = slots.get()
        try:
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            on_finish(run_id, execute(root, run_id, launcher_, extra, env))
        finally:
            slots.put(slot)

    if jobs == 1:
        for run_id in run_ids:
            one(run_id)
        return
    if launcher_ is None:
        start_fork_server()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, run_id) for run_id in run_ids]:
            future.result()
