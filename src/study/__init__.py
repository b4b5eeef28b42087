"""Studies: a YAML file of many runs (a ``base`` configuration, ``grid`` and ``zip`` axes),
expanded to runs with content-addressed ids, executed resumably by an existing engine (local
processes, torchrun, Slurm through submitit), aggregated into one tidy table and one report.

A study folder::

    <study>/study.yaml            the study file of the last plan or run
    <study>/plan.json             the runs: id, label, varying values, command
    <study>/runs/<id>/            one run folder each (the output contract of a single run)
    <study>/runs/<id>.log         its console output
    <study>/runs/<id>.argv.json   the command it was first started with (reused to resume it)
    <study>/runs/<id>.exit        the exit status of its last attempt
    <study>/locks/<id>.lock       held (flock) by the process executing it
    <study>/study.csv, .parquet   every run x condition
    <study>/report/               the cross-run report with corrected p-values and plots

Modules: ``spec`` (file -> runs), ``state`` (folders, locks, done/running/failed/pending),
``execute`` (one run; local and torchrun executors), ``slurm`` (submitit), ``aggregate``
(study.csv, Holm and Benjamini-Hochberg), ``report`` (the study report), ``cli``.
"""
