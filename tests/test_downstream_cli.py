"""--downstream-tasks through the real CLI: baseline and every perturbation condition."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

SMALL = ["--max-length", "32", "--max-samples", "2", "--batch-size", "4", "--topk", "3",
         "--mode", "global", "--seeds", "0"]


@pytest.mark.slow
def test_downstream_before_and_after_perturbation(tmp_path):
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("\n".join(json.dumps({"text": t}) for t in [
        "Mara packed the kite, the string and a sandwich. At the beach she unrolled the kite",
        "The lighthouse keeper wound the clock every night. One evening he forgot the clock",
    ]) + "\n")
    out = tmp_path / "out"
    proc = run_cli(*SMALL, "--perturb", "zero", "--controls", "random", "--downstream-tasks",
                   "hellaswag,lambada", "--task-data", f"lambada={lambada}", "--task-samples", "3",
                   "--out-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "downstream_results.json").read_text())
    assert results["n_items"] == {"hellaswag": 3, "lambada": 2}
    assert {"acc", "acc_norm", "n"} <= set(results["baseline"]["hellaswag"])
    assert {"acc", "perplexity", "n"} <= set(results["baseline"]["lambada"])
    conditions = [(c["selection"], c["seed"]) for c in results["conditions"]]
    perturbation = json.loads((out / "perturbation_results.json").read_text())
    assert conditions == [(c["selection"], c["seed"]) for c in perturbation["conditions"]]
    top = results["conditions"][0]
    # zeroing the global top-3 grad_x_weight weights wrecks the model: LAMBADA perplexity explodes
    assert top["tasks"]["lambada"]["perplexity"] > 10 * results["baseline"]["lambada"]["perplexity"]
    assert top["delta"]["lambada"]["perplexity"] > 0
    assert "downstream hellaswag" in proc.stdout


def test_downstream_flag_errors(tmp_path, capsys):
    from src.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    tiny = ["--model", "random:tiny-llama", "--out-dir", tmp_path / "o"]
    for args, message in [
        (["--downstream-tasks", "piqa"], "unknown --downstream-tasks"),
        (["--task-samples", "3"], "--task-samples has no effect without --downstream-tasks"),
        (["--downstream-tasks", "lambada", "--task-data", f"hellaswag={bad}"], "not in --downstream-tasks"),
        (["--downstream-tasks", "lambada", "--task-data", f"lambada={bad}"], "bad.jsonl"),
        (["--downstream-tasks", "lambada", "--task-data", f"lambada={tmp_path / 'none.jsonl'}"], "none.jsonl"),
    ]:
        assert main([*map(str, tiny), *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
