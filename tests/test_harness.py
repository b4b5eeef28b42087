"""lm-evaluation-harness tasks through the harness itself, and the built-in scorer in lockstep
with it: same tokenization (BOS included), same scores, same numbers as the harness's own
command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from src.cli import main
from src.data import task_items
from src.eval import downstream as ds
from src.eval import harness
from src.models.builtin import builtin_cache_folder, default_cache_dir
from tests.conftest import ROOT

BUNDLED = str(ROOT / "src" / "data" / "harness_tasks")
PAIRS = {"cwa_hellaswag": "hellaswag", "cwa_lambada": "lambada"}


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer that adds BOS to every encoding, built here (no download)."""
    from tokenizers import processors

    from src.models.loader import local_bpe_tokenizer

    base = local_bpe_tokenizer(vocab_size=600)
    backend = base.backend_tokenizer
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_bos_tokenizer_scores_equal_the_harness_request_by_request():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok = bos_tokenizer()
    assert tok.encode("one two")[0] == tok.bos_token_id  # it really adds BOS
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    requests = [("The river rose", " slowly"), ("", " hello world"), ("Good morning ", "friend"),
                ("<s>Already opened", " by hand"), ("a b c d e f g h i j k l m n o p", " q r")]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=12)
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, pair, i)
                               for i, pair in enumerate(requests)], disable_tqdm=True)
    ours = ds.score_requests(model, tok, requests, batch_size=3, max_length=12)
    for (their_ll, their_greedy), (our_ll, our_greedy), pair in zip(theirs, ours, requests):
        assert our_ll == pytest.approx(their_ll, abs=1e-5), pair
        assert our_greedy == their_greedy, pair
    for context, continuation in requests[:1] + requests[2:4]:  # non-empty contexts
        ours = ds.encode_requests(tok, [(context, continuation)])[0]
        assert tuple(ours) == tuple(lm._encode_pair(context, continuation)), context


def test_parse_results_names_metrics_without_the_filter():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                 "exact_match,strict": 0.2, "exact_match_stderr,strict": "N/A",
                                 "exact_match,flexible": 0.3,
                                 "exact_match_stderr,flexible": 0.05}},
               "n-samples": {"t": {"original": 10, "effective": 8}}}
    parsed = harness.parse_results(results)["t"]
    assert parsed == {"acc": 0.5, "acc_stderr": 0.1, "exact_match,strict": 0.2,
                      "exact_match_stderr,strict": None, "exact_match,flexible": 0.3,
                      "exact_match_stderr,flexible": 0.05, "n": 8}


@pytest.mark.slow
def test_unknown_and_offline_tasks_fail_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    tiny = ["--model", "random:tiny-llama", "--out-dir", str(tmp_path / "o")]
    assert main([*tiny, "--lm-eval-tasks", "hellaswagg"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task 'hellaswagg'; close matches: hellaswag" in err
    assert main([*tiny, "--lm-eval-tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "lm-eval task 'arc_easy'" in err and "--lm-eval-include" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert main([*tiny, "--lm-eval-limit", "4"]) == 2
    assert "--lm-eval-limit has no effect without --lm-eval-tasks" in capsys.readouterr().err
    assert main([*tiny, "--downstream-tasks", "hellaswag", "--lm-eval-tasks", "hellaswag"]) == 2
    assert "in both --downstream-tasks and --lm-eval-tasks" in capsys.readouterr().err


@pytest.mark.slow
def test_builtin_scorer_in_lockstep_with_the_harness(builtin):
    """The bundled items through both paths on the built-in model: equal acc and acc_norm,
    LAMBADA perplexity to 1e-4 relative."""
    n = 6
    tasks = harness.load_tasks(list(PAIRS), BUNDLED, None, n, 4, False)
    theirs = harness.evaluate(builtin.model, builtin.tokenizer, tasks)
    items = {ours: task_items.load_task_items(ours)[:n] for ours in PAIRS.values()}
    ours = ds.evaluate_tasks(builtin.model, builtin.tokenizer, items, batch_size=4)
    for their_name, our_name in PAIRS.items():
        for metric in ("acc", "acc_norm"):
            if metric in ours[our_name]:
                assert ours[our_name][metric] == pytest.approx(theirs[their_name][metric],
                                                               abs=1e-6)
    assert ours["lambada"]["perplexity"] == pytest.approx(theirs["cwa_lambada"]["perplexity"],
                                                          rel=1e-4)
    assert theirs["cwa_hellaswag"]["n"] == n


@pytest.mark.slow
def test_cli_under_perturbation_equals_the_harness_command_line(tmp_path):
    out = tmp_path / "run"
    args = ["--max-length", "64", "--max-samples", "4", "--topk", "10", "--mode", "global",
            "--perturb", "zero", "--controls", "random_k", "--seeds", "0",
            "--lm-eval-tasks", "cwa_hellaswag,cwa_lambada", "--lm-eval-include", BUNDLED,
            "--lm-eval-limit", "4", "--batch-size", "4", "--out-dir", out]
    assert main([str(a) for a in args]) == 0
    results = json.loads((out / "downstream_results.json").read_text())
    assert results["complete"] and results["lm_eval"]["tasks"]["cwa_lambada"]["config_sha256"]
    assert [c["selection"] for c in results["conditions"]] == ["top_k", "random_k"]
    top = results["conditions"][0]["tasks"]["cwa_lambada"]["perplexity"]
    assert top > 10 * results["baseline"]["cwa_lambada"]["perplexity"]  # the super weight
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["lm_eval"]["version"] == results["lm_eval"]["version"]
    cli_out = tmp_path / "harness_cli"
    model = builtin_cache_folder(default_cache_dir())
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={model},dtype=float32", "--tasks", "cwa_hellaswag,cwa_lambada",
         "--include_path", BUNDLED, "--device", "cpu", "--batch_size", "4", "--limit", "4",
         "--output_path", str(cli_out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_MULTIPROC": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(next(cli_out.rglob("results_*.json")).read_text())
    cli = harness.parse_results(printed)
    for task in ("cwa_hellaswag", "cwa_lambada"):
        for metric, value in cli[task].items():  # bootstrapped stderrs: other resamples
            ours = results["baseline"][task][metric]
            if metric != "perplexity_stderr" and isinstance(value, float):
                assert ours == pytest.approx(value, rel=1e-6), (task, metric)


@pytest.mark.slow
def test_task_config_hash_is_the_same_in_every_process():
    """A task config holds functions (process_docs); their repr carries a memory address that
    differs from process to process, so the hash must not use it."""
    code = ("from src.eval import harness; import json; print(json.dumps(harness.load_tasks("
            f"['cwa_hellaswag', 'cwa_lambada'], {BUNDLED!r}, None, 4, 2, False).info))")
    hashes = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        info = json.loads(done.stdout.strip().splitlines()[-1])
        hashes.append({task: t["config_sha256"] for task, t in info["tasks"].items()})
    assert hashes[0] == hashes[1] and len(hashes[0]) == 2
