"""Model loading: built-in (cached), every random family, local folders, .gguf, errors."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from src.errors import UserError
from src.models import builtin as builtin_model, loader
from src.models.presets import PRESETS
from tests.conftest import load, run_cli


def test_builtin_model_loads_with_its_tokenizer(builtin):
    info = builtin.info
    assert info["source"] == "builtin" and info["architecture"] == "llama"
    assert 130e6 < info["n_parameters"] < 140e6
    assert info["tied_embeddings"] and info["max_context"] == 8192
    ids = builtin.tokenizer("The cat sat on the mat.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = builtin.model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert not builtin.model.training


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("tiny-")])
def test_each_random_family_builds_and_runs(preset):
    tiny = load(f"random:{preset}")
    assert tiny.info["source"] == "random"
    embedding_rows = tiny.model.get_input_embeddings().weight.shape[0]
    assert embedding_rows >= len(tiny.tokenizer)
    ids = tiny.tokenizer(["a short test sentence", "another one"], return_tensors="pt",
                         padding=True)
    with torch.no_grad():
        logits = tiny.model(**ids).logits
    assert logits.shape[-1] == embedding_rows and torch.isfinite(logits).all()
    # the pad token (also the document separator) has a random embedding like a trained
    # model's, not the zero row a padding index gives: a block starting with a zero state
    # overflowed the gradient of a bfloat16 llama-3.1-8b
    pad = tiny.model.config.pad_token_id
    assert pad is not None and pad == (tiny.tokenizer.pad_token_id
                                       if tiny.tokenizer.pad_token_id is not None
                                       else tiny.tokenizer.eos_token_id)
    assert tiny.model.get_input_embeddings().weight[pad].abs().sum() > 0
    # built on the meta device and given storage: the output head must still share the
    # embedding's storage where the architecture ties them
    tied = tiny.model.get_output_embeddings().weight is tiny.model.get_input_embeddings().weight
    assert tied == bool(tiny.model.config.tie_word_embeddings)
    assert tiny.model.config.eos_token_id == tiny.tokenizer.eos_token_id


def test_random_preset_weights_are_drawn_once(monkeypatch):
    """Each weight comes from random_init's streams alone: the architecture's own initialiser
    runs only on the meta device (a second draw of every weight would be slow at 8B)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel._init_weights
    touched = []

    def only_on_meta(self, module):
        touched.extend(p.device.type for p in module.parameters(recurse=False))
        return original(self, module)

    monkeypatch.setattr(PreTrainedModel, "_init_weights", only_on_meta)
    model = load("random:tiny-llama").model
    assert touched and set(touched) == {"meta"}
    assert torch.isfinite(model.lm_head.weight).all()


def test_random_model_from_config_json_and_without_builtin_tokenizer(tmp_path, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, '
                      '"n_positions": 64, "vocab_size": 9000}')
    monkeypatch.setattr(loader, "builtin_tokenizer", lambda cache: None)  # as on a GPU machine
    tiny = load(f"random:{config}")
    assert len(tiny.tokenizer) <= 9000
    ids = tiny.tokenizer("offline tokenizer works", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < 9000
    with pytest.raises(UserError, match="unknown random preset"):
        load("random:no-such-preset")


@pytest.mark.slow
def test_local_folder_and_gguf_file(builtin):
    folder = builtin_model.builtin_cache_folder(builtin_model.default_cache_dir())
    local = load(str(folder))
    assert local.info["source"] == "local"
    gguf = builtin_model.builtin_gguf_path()
    from_gguf = load(str(gguf))
    assert from_gguf.info["source"] == "gguf"
    name = "model.layers.3.mlp.down_proj.weight"
    reference = dict(builtin.model.named_parameters())[name]
    assert torch.equal(dict(local.model.named_parameters())[name], reference)
    assert torch.equal(dict(from_gguf.model.named_parameters())[name], reference)


@pytest.mark.slow
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, builtin):
    source = builtin_model.builtin_cache_folder(builtin_model.default_cache_dir())
    cache = tmp_path / "cache"
    target = builtin_model.builtin_cache_folder(cache)
    shutil.copytree(source, target)
    assert builtin_model._cache_is_valid(target)
    weights = next(target.glob("*.safetensors"))
    with open(weights, "r+b") as handle:  # flip one byte in the middle of the weights
        handle.seek(weights.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert not builtin_model._cache_is_valid(target)
    reloaded = load(None, cache_dir=str(cache))  # rebuilds from the GGUF, then loads
    assert builtin_model._cache_is_valid(target)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(dict(reloaded.model.named_parameters())[name],
                       dict(builtin.model.named_parameters())[name])
    (target / builtin_model.CACHE_MARKER).unlink()  # a partial cache (no marker) is never loaded
    assert not builtin_model._cache_is_valid(target)


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert builtin_model.default_cache_dir() == tmp_path / "critical-weight-analysis"


def test_device_and_dtype_resolution():
    assert loader.resolve_device("cpu").type == "cpu"
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loader.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(UserError, match="bad --device"):
        loader.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            loader.resolve_device("cuda:0")


# ----------------------------------------------------------------------------- broken model folders

def save_tiny_model_folder(folder: Path) -> Path:
    """A complete local model folder (config.json, model.safetensors, tokenizer) of the
    random:tiny-llama preset: about 25 MB, where the built-in model's folder is 538 MB."""
    tiny = load("random:tiny-llama")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def truncate(weights: Path) -> Path:
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return weights


def as_pytorch_bin(folder: Path) -> Path:
    """The folder's weights as pytorch_model.bin (torch.save), the safetensors file removed."""
    safetensors_file = folder / "model.safetensors"
    weights = folder / "pytorch_model.bin"
    torch.save(load_file(safetensors_file), weights)
    safetensors_file.unlink()
    return weights


def random_bytes_safetensors(folder: Path) -> Path:
    weights = folder / "model.safetensors"
    weights.write_bytes(os.urandom(100_000))
    return weights


def truncated_safetensors(folder: Path) -> Path:
    return truncate(folder / "model.safetensors")


def random_bytes_bin(folder: Path) -> Path:
    weights = as_pytorch_bin(folder)
    weights.write_bytes(random.Random(0).randbytes(100_000))
    return weights


def test_any_garbage_pytorch_bin_is_a_one_line_error(tmp_path):
    """Random bytes reach the unpickler in many ways (bad opcodes, its asserts, lookups): each
    is the file's one-line error, never a traceback (os.urandom once found an uncaught one)."""
    from src.models.checkpoint import _check_readable

    weights = tmp_path / "pytorch_model.bin"
    for seed in range(200):
        weights.write_bytes(random.Random(seed).randbytes(2_000))
        with pytest.raises(UserError, match="cannot be read by torch.load"):
            _check_readable(weights)


def truncated_bin(folder: Path) -> Path:
    return truncate(as_pytorch_bin(folder))


def index_naming_a_missing_shard(folder: Path) -> Path:
    """Two shards and their index, the second shard deleted: the index is what names it."""
    single = folder / "model.safetensors"
    tensors = load_file(single)
    names = sorted(tensors)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({name: tensors[name] for name in names[:len(names) // 2]}, folder / first,
              metadata={"format": "pt"})
    weight_map = {name: first if i < len(names) // 2 else second for i, name in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    single.unlink()
    return folder / second


@pytest.fixture(scope="module")
def saved_tiny_folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def model_folder(saved_tiny_folder, tmp_path):
    """A fresh copy of the saved tiny model folder, for one test to break."""
    return Path(shutil.copytree(saved_tiny_folder, tmp_path / "model"))


@pytest.mark.parametrize("damage, reason", [
    (random_bytes_safetensors, "corrupt or truncated"),
    (truncated_safetensors, "corrupt or truncated"),
    (random_bytes_bin, "torch.load"),
    (truncated_bin, "torch.load"),
    (index_naming_a_missing_shard, "model.safetensors.index.json' names shard"),
])
def test_broken_weights_file_is_named_in_one_line(model_folder, damage, reason):
    bad_file = damage(model_folder)
    with pytest.raises(UserError) as caught:
        load(str(model_folder))
    message = str(caught.value)
    assert f"'{bad_file}'" in message and reason in message, message
    assert "\n" not in message


def test_weights_that_do_not_fit_the_config_name_the_parameter_and_both_shapes(model_folder):
    config_file = model_folder / "config.json"
    config = json.loads(config_file.read_text())
    config["intermediate_size"] = 96  # the weights were saved with 128
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError) as caught:
        load(str(model_folder))
    message = str(caught.value)
    assert "model.layers.0.mlp.down_proj.weight" in message, message
    assert "(64, 128)" in message and "(64, 96)" in message and "\n" not in message


@pytest.mark.slow
def test_broken_weights_file_exits_2_with_one_line_and_no_output(model_folder, tmp_path):
    bad_file = random_bytes_safetensors(model_folder)
    out = tmp_path / "out"
    proc = run_cli("--model", model_folder, "--device", "cpu", "--max-length", "32",
                   "--max-samples", "4", "--out-dir", out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"'{bad_file}'" in lines[0]
    assert not out.exists()
