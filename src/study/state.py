"""Where a study keeps each run, and what state each run is in.

States: ``done`` (its manifest says succeeded), ``running`` (a process holds its study lock or
its run folder's lock), ``failed`` (its last attempt exited with an error: only ``--retry-failed``
runs it again), ``pending`` (never started, or cut short by a signal or a kill: resumed).

The per-run lock is an advisory ``flock`` on ``locks/<id>.lock``: the kernel drops it when its
process ends however it ends (SIGKILL included), so a killed study leaves no stale lock, and two
study processes on one folder (or Slurm jobs on a shared file system with working flock)
never run the same run twice.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

from src.utils.io import read_json
from src.utils.output import LOCK_NAME, MANIFEST, holder

STATES = ("done", "running", "failed", "pending")
# Exit statuses of a run stopped from outside (SIGHUP, Ctrl-C, SIGTERM, and death by a signal as
# subprocess reports it): the run is resumed, not counted as failed.
STOPPED_FROM_OUTSIDE = {129, 130, 143}


class StudyFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.locks = self.root / "locks"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def log(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.log"

    def argv_file(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.argv.json"

    def exit_file(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.exit"

    def lock_file(self, run_id: str) -> Path:
        return self.locks / f"{run_id}.lock"

    def manifest(self, run_id: str) -> dict | None:
        path = self.run_dir(run_id) / MANIFEST
        return read_json(path) if path.is_file() else None

    def last_exit(self, run_id: str) -> int | None:
        path = self.exit_file(run_id)
        return int(path.read_text().strip()) if path.is_file() else None

    def state(self, run_id: str) -> str:
        manifest = self.manifest(run_id)
        if manifest and manifest.get("status") == "succeeded":
            return "done"
        if self.lock_held(run_id) or holder(str(self.run_dir(run_id))) is not None:
            return "running"
        code = self.last_exit(run_id)
        if code is not None and code > 0 and code not in STOPPED_FROM_OUTSIDE:
            return "failed"
        return "pending"

    def lock_held(self, run_id: str) -> bool:
        path = self.lock_file(run_id)
        if not path.is_file():
            return False
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    @contextmanager
    def claimed(self, run_id: str):
        """Yields True while this process holds the run's lock, False when another one does."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file(run_id), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            handle.truncate(0)
            handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
            handle.flush()
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def has_partial_run(self, run_id: str) -> bool:
        """The folder holds a run that did not succeed and can be continued (--resume)."""
        manifest = self.manifest(run_id)
        return manifest is not None and manifest.get("status") != "succeeded" and \
            (self.run_dir(run_id) / "config.json").is_file()

    def has_leftovers(self, run_id: str) -> bool:
        """Files of an attempt killed before its manifest existed (replaced with --overwrite)."""
        folder = self.run_dir(run_id)
        return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())
