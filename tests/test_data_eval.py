"""Data split, packing, and evaluation against a hand computation."""
from __future__ import annotations

import math

import pytest
import torch

from src.data.loading import (TokenBlocks, bundled_documents, pack_blocks, parse_documents,
                              prepare_data, split_documents)
from src.errors import UserError
from src.eval.perplexity import evaluate


def test_bundled_corpus_is_large_and_varied():
    documents = bundled_documents()
    assert len(documents) >= 60
    assert sum(len(d.encode()) for d in documents) >= 40_000
    assert len(set(documents)) == len(documents)


def test_parse_blank_line_and_line_formats():
    assert parse_documents("a b\nc\n\nd e\n\n\nf") == ["a b c", "d e", "f"]
    assert parse_documents("one\ntwo\n three \n") == ["one", "two", "three"]


def test_split_is_disjoint_deterministic_and_covers_everything():
    documents = [f"document {i} text" for i in range(11)] + ["document 3 text"]
    calibration, evaluation = split_documents(documents)
    assert not set(calibration) & set(evaluation)
    assert set(calibration) | set(evaluation) == set(documents)
    assert split_documents(documents) == (calibration, evaluation)
    single_cal, single_eval = split_documents(["alpha beta gamma delta epsilon"])
    assert single_cal and single_eval and not set(single_cal) & set(single_eval)


def test_calibration_and_evaluation_blocks_share_no_document(builtin):
    data = prepare_data(builtin.tokenizer, max_length=32, max_samples=None)
    calibration, evaluation = split_documents(bundled_documents())
    cal_text = builtin.tokenizer.decode(data.calibration.input_ids.reshape(-1))
    for doc in evaluation[:10]:
        assert doc[:80] not in cal_text
    assert data.calibration.sha256() != data.evaluation.sha256()
    capped = prepare_data(builtin.tokenizer, max_length=32, max_samples=3)
    assert len(capped.calibration) == len(capped.evaluation) == 3
    assert torch.equal(capped.evaluation.input_ids, data.evaluation.input_ids[:3])


def test_pack_blocks_joins_with_eos_and_drops_the_tail(builtin):
    tok = builtin.tokenizer
    blocks = pack_blocks(tok, ["hello world", "second text here"], max_length=3, max_blocks=None)
    stream = tok("hello world", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + \
        tok("second text here", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 3
    assert blocks.input_ids.tolist() == [stream[i * 3:(i + 1) * 3] for i in range(n)]


def test_data_too_short_and_missing_files(builtin, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny text.\n\nanother tiny text.\n")
    with pytest.raises(UserError, match="data too short"):
        prepare_data(builtin.tokenizer, data_file=str(short), max_length=64, max_samples=2)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        prepare_data(builtin.tokenizer, data_file=str(empty), max_length=8, max_samples=2)
    with pytest.raises(UserError, match="does not exist"):
        prepare_data(builtin.tokenizer, data_file=str(tmp_path / "nope.txt"), max_length=8,
                     max_samples=2)


def hand_evaluation(model, ids, mask):
    """Token-mean NLL, perplexity and accuracy with an explicit loop over positions."""
    total_nll, total_correct, count = 0.0, 0, 0
    with torch.no_grad():
        for b in range(ids.shape[0]):
            length = int(mask[b].sum())  # right padding
            logits = model(input_ids=ids[b:b + 1, :length]).logits[0]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            for t in range(length - 1):
                total_nll -= float(log_probs[t, ids[b, t + 1]])
                total_correct += int(logits[t].argmax() == ids[b, t + 1])
                count += 1
    return total_nll / count, math.exp(total_nll / count), total_correct / count, count


def test_evaluation_matches_hand_computation_with_padding(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (5, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    ids[mask == 0] = 0  # pad id: must not matter
    result = evaluate(tiny_llama.model, TokenBlocks(ids, mask), batch_size=2)
    nll, ppl, acc, count = hand_evaluation(tiny_llama.model, ids, mask)
    assert result.n_tokens == count == 11 * 3 + 6 + 2
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(ppl, rel=1e-5)
    assert result.token_accuracy == pytest.approx(acc)
    assert int(result.block_tokens.sum()) == count


def test_overflowing_perplexity_is_inf_not_a_crash(tiny_llama):
    ids = torch.randint(0, 500, (2, 8))
    head = tiny_llama.model.lm_head.weight
    saved = head.data.clone()
    try:
        head.data.fill_(float("inf"))
        result = evaluate(tiny_llama.model, TokenBlocks(ids, torch.ones_like(ids)), batch_size=2)
    finally:
        head.data.copy_(saved)
    assert math.isinf(result.perplexity) and math.isinf(result.nll)
