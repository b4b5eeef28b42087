"""The output folder of a run: one run per folder, one process at a time, nothing lost.

* ``location_problem(path)``: whether the folder can be created and written, found out before
  anything heavy loads (a temporary file is made and removed; nothing else is touched).
* ``claim(path, ...)``: takes the folder's lock file (pid, host, start time; a lock whose process
  is gone is taken over) and refuses a folder that already holds files, unless the previous run
  is to be replaced (its files are removed only once the new run really starts) or resumed.
  On leaving, the lock is released and a folder the claim created is removed again when nothing
  was written into it, so bad input never leaves traces.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from src.errors import UserError
from src.utils.secrets import redact

LOCK_NAME = ".cwa.lock"
RUN_FILES = ("config.json", "experiment_manifest.json", "sensitivity_stats.json",
             "top_weights.csv", "perturbation_results.json", "stability_results.json",
             "downstream_results.json", "enhanced_analysis.json", "scores.safetensors",
             "quantization_results.json", "perturbation_blocks.csv", "quantization_blocks.csv")
MANIFEST = "experiment_manifest.json"


def location_problem(path: str) -> str | None:
    """Why ``path`` cannot hold a run's output (None when it can)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        return f"'{path}' exists and is a file; choose a folder"
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            return _dangling_link_problem(path, existing, under=existing != folder)
        existing = existing.parent
    if not existing.is_dir():
        return f"'{path}' lies under '{existing}', which is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(prefix=".cwa-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return f"'{path}' cannot be written ({error.strerror or error}: '{existing}')"
    return None


def _dangling_link_problem(path: str, link: Path, under: bool) -> str:
    where = f"lies under '{link}', which " if under else ""
    return (f"'{path}' {where}is a symbolic link to '{os.readlink(link)}', which does not exist "
            f"(or loops); create its target or choose another folder")


def folder_problem(path: str, *, replace: bool = False, resume: bool = False) -> str | None:
    """Why a run may not write into ``path`` now: it cannot be written, another live run holds
    it, or it holds files and neither replacing nor resuming was asked for."""
    problem = location_problem(path)
    if problem:
        return f"--out-dir {problem}"
    record = holder(path)
    if record is not None:
        return in_use_message(path, record)
    files = previous_run_files(path)
    if files and not (replace or resume):
        return occupied_message(path, files)
    return None


def in_use_message(path, record: dict) -> str:
    return (f"--out-dir '{path}' is in use by another run (pid {record['pid']} on "
            f"{record['host']}, since {record.get('started_at', '?')}); wait for it to finish "
            f"or choose another folder")


def holder(path: str) -> dict | None:
    """The lock record of a live run holding ``path`` (None when free or its holder is gone)."""
    record = _read_lock(Path(path) / LOCK_NAME)
    return record if record is not None and process_alive(record) else None


def previous_run_files(path: str) -> list[str]:
    """Names in ``path`` other than the lock: a folder holding any of them holds a run."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


@contextmanager
def claim(path: str, *, replace: bool = False, resume: bool = False):
    """Hold the folder for one run (see the module docstring); yields the folder."""
    folder = Path(path)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _take_lock(folder)
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    try:
        files = previous_run_files(path)
        if files and not (replace or resume):
            raise UserError(occupied_message(path, files))
        yield folder
    finally:
        (folder / LOCK_NAME).unlink(missing_ok=True)
        _remove_if_empty(folder, created)


def occupied_message(path: str, files: list[str]) -> str:
    shown = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
    return (f"--out-dir '{path}' already holds files ({shown}); pass --overwrite to replace "
            f"the run there, or choose another folder")


def listed_files(folder: Path) -> set[str]:
    """The files the folder's manifest lists as its run's (none when it has no readable one)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return set()
    try:
        return {f["path"] for f in json.loads(manifest.read_text()).get("output_files", [])
                if isinstance(f, dict) and isinstance(f.get("path"), str)}
    except (OSError, ValueError, AttributeError):
        return set()


def remove_previous_run(folder: Path) -> list[str]:
    """The files of the run that was in ``folder``: what its manifest lists, the contract's file
    names and plots/; anything else stays. Returns what was removed."""
    removed = []
    for name in dict.fromkeys([*sorted(listed_files(folder)), *RUN_FILES]):
        target = (folder / name).resolve()
        if folder.resolve() not in target.parents or not target.is_file():
            continue  # never outside the folder, never a folder named like a file
        target.unlink()
        removed.append(name)
    if (folder / "plots").is_dir():
        shutil.rmtree(folder / "plots")
        removed.append("plots/")
    return removed


# ----------------------------------------------------------------------------- lock

def _lock_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _take_lock(folder: Path) -> None:
    lock = folder / LOCK_NAME
    for _ in range(3):  # a stale lock is removed and the race for a new one run again
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            record = _read_lock(lock)
            if record is not None and process_alive(record):
                raise UserError(in_use_message(folder, record)) from None
            lock.unlink(missing_ok=True)  # its process is gone: take the folder over
            continue
        with os.fdopen(handle, "w") as stream:
            json.dump(_lock_record(), stream)
        return
    raise UserError(f"--out-dir '{folder}': could not take its lock; try again")


def _read_lock(lock: Path) -> dict | None:
    try:
        record = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    return record


def process_alive(record: dict) -> bool:
    """Whether the process of a lock or manifest record ({pid, host}) still runs (one on another
    host counts as alive: it cannot be checked from here)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return not _zombie(record["pid"])


def _zombie(pid: int) -> bool:
    """A killed process whose parent has not reaped it yet still answers kill(pid, 0)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _remove_if_empty(folder: Path, created: bool) -> None:
    if created and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def default_out_dir(model: str, metric: str, topk: int) -> str:
    """results/<model>_<metric>_k<K>_<time>: a new folder per run (no password of a model URL
    in its name)."""
    safe_model = re.sub(r"[^A-Za-z0-9_.-]+", "-", redact(model)).strip("-") or "model"
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return str(Path("results") / f"{safe_model}_{metric}_k{topk}_{stamp}")
