"""The ``slurm`` executor: one submitit job array per wave of the study, one job per run.

Settings (study file ``executor:`` or flags): ``partition``, ``gpus_per_job``, ``cpus_per_job``,
``time`` (minutes), ``account``, ``parallelism`` (jobs of the array at once). A preempted or
timed-out job is requeued by submitit (``RunJob.checkpoint``) and its run resumes with
``--resume``. Job scripts and logs go to ``<study>/slurm/``. ``submitit-local`` runs the same job
array through submitit's local executor (processes on this machine), which is how it is tested.
"""
from __future__ import annotations

import os
from pathlib import Path

from src.errors import UserError
from src.study.execute import RUNNER, execute

SUBMITIT_KINDS = {"slurm": "slurm", "submitit-local": "local"}


class RunJob:
    """One run as a submitit job: picklable, resumable on requeue."""

    def __init__(self, root: str, launcher: list[str], extra: list[str]):
        self.root, self.launcher, self.extra = root, launcher, extra

    def __call__(self, run_id: str) -> int | None:
        return execute(self.root, run_id, self.launcher, self.extra)

    def checkpoint(self, run_id: str):
        """Called by submitit on preemption or timeout: requeue the same run (it resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, run_id)


def submitit_executor(root: Path, kind: str, settings: dict):
    try:
        import submitit
    except ImportError:
        raise UserError(f"the {kind} executor needs submitit: pip install submitit (or "
                        f"pip install '.[tracking]')") from None
    executor = submitit.AutoExecutor(folder=str(root / "slurm" / "%j"),
                                     cluster=SUBMITIT_KINDS[kind])
    parameters = {"timeout_min": int(settings.get("time", 60)), "nodes": 1, "tasks_per_node": 1,
                  "cpus_per_task": int(settings.get("cpus_per_job", 4))}
    if kind == "slurm":
        parameters.update(slurm_array_parallelism=int(settings.get("parallelism", 64)))
        if settings.get("partition"):
            parameters["slurm_partition"] = str(settings["partition"])
        if settings.get("account"):
            parameters["slurm_account"] = str(settings["account"])
        if int(settings.get("gpus_per_job", 0)):
            parameters["gpus_per_node"] = int(settings["gpus_per_job"])
    executor.update_parameters(**parameters)
    return executor


def run_array(root: Path, run_ids: list[str], launcher: list[str], extra: list[str], kind: str,
              settings: dict, on_finish) -> None:
    """Submit one job array for ``run_ids`` and wait for it; ``on_finish(run_id, status)``."""
    # the jobs unpickle RunJob: they must find this package wherever they start
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(RUNNER.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    executor = submitit_executor(root, kind, settings)
    jobs = executor.map_array(RunJob(str(root), launcher, extra), run_ids)
    print(f"[study] submitted {len(jobs)} {kind} job(s): "
          f"{', '.join(job.job_id for job in jobs[:8])}{' ...' if len(jobs) > 8 else ''}",
          flush=True)
    for run_id, job in zip(run_ids, jobs):
        try:
            status = job.result()
        except Exception as error:  # the job itself failed (not the run): its status says so
            print(f"[study] job {job.job_id} of run {run_id} failed: "
                  f"{str(error).strip().splitlines()[-1][:300]}", flush=True)
            status = 1
        on_finish(run_id, status)
