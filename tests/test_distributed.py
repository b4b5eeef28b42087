"""Larger than one process: torchrun data parallelism (gloo) and --device-map, on the CPU.

A 2-rank torchrun run must give the same scores, top-K, perturbation and stability results as one
process (within float tolerance: only the summation order differs), with rank 1 writing nothing;
an explicit device map must run end to end and give the same results as no map.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from src.cli import config_from_argv
from src.errors import UserError
from src.models.device_map import resolve_device_map
from src.distributed import ranks as distributed
from tests.conftest import ROOT, RUNNER, run_cli

TINY = ["--model", "random:tiny-llama", "--max-length", "32", "--max-samples", "4",
        "--batch-size", "1", "--topk", "5", "--seeds", "0,1", "--save-scores"]
PROTOCOL = ["--metric", "grad_x_weight", "--perturb", "sign_flip", "--controls", "random_k,bottom_k",
            "--stability-check", "--stability-batches", "2", "--bit-format", "int8",
            "--fault-injection", "6", "--fault-eval-samples", "3", "--bit-search", "2",
            "--bit-search-candidates", "3", "--mediation", "--mediation-weights", "2",
            "--atp-exact", "2"]
CPU_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
           "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(RUNNER),
               *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the protocol on the tiny preset: what the other layouts must reproduce."""
    out = tmp_path_factory.mktemp("one")
    assert_ok(run_cli(*TINY, *PROTOCOL, "--out-dir", out))
    return out


def assert_same_results(one, other):
    assert sorted(os.listdir(one)) == sorted(os.listdir(other))  # rank 1 wrote nothing extra
    a, b = load_file(one / "scores.safetensors"), load_file(other / "scores.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # absolute slack relative to the tensor's scale: signed means cancel
        scale = float(a[name].nan_to_num().abs().max())
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5 * scale + 1e-12,
                                   equal_nan=True)
    top_a, top_b = pd.read_csv(one / "top_weights.csv"), pd.read_csv(other / "top_weights.csv")
    pd.testing.assert_frame_equal(top_a[["rank", "parameter", "row", "col", "flat_index"]],
                                  top_b[["rank", "parameter", "row", "col", "flat_index"]])
    assert top_b["score"].to_numpy() == pytest.approx(top_a["score"].to_numpy(), rel=1e-4)
    for name, keys in (("perturbation_results.json", ("conditions",)),
                       ("stability_results.json", ("across_seeds", "across_batches")),
                       ("fault_injection.json", ("baseline", "injections", "by")),
                       ("bit_search.json", ("baseline", "steps", "random_flips")),
                       ("mediation.json", ("clean", "damaged"))):
        if not (one / name).exists():
            continue
        ja, jb = json.loads((one / name).read_text()), json.loads((other / name).read_text())
        for key in keys:
            assert _numbers(jb[key]) == pytest.approx(_numbers(ja[key]), rel=1e-4, nan_ok=True)


def _numbers(value) -> list:
    """The numbers in ``value`` in a fixed order, without wall-clock "seconds"."""
    if isinstance(value, dict):
        return [x for k in sorted(value) if k != "seconds" for x in _numbers(value[k])]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.mark.slow
def test_two_ranks_match_one_process(reference, tmp_path):
    out = tmp_path / "two"
    proc = torchrun(*TINY, *PROTOCOL, "--out-dir", out)
    assert_ok(proc)
    assert_same_results(reference, out)
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["success"] is True
    text = json.dumps(manifest)
    assert '"world_size": 2' in text and '"backend": "gloo"' in text


@pytest.mark.slow
def test_two_ranks_hutchinson_mean_and_stderr_match(tmp_path):
    """Batches keep their single-process indices (same probes); moments merge exactly."""
    args = [*TINY, "--metric", "hutchinson_diag", "--hutchinson-samples", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_cli(*args, "--out-dir", one))
    assert_ok(torchrun(*args, "--out-dir", two))
    assert_same_results(one, two)
    stderr = load_file(two / "scores.safetensors")
    assert any(name.endswith("::stderr") for name in stderr)


@pytest.mark.slow
def test_explicit_device_map_on_cpu_matches_plain_run(reference, tmp_path):
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(CPU_MAP))
    out = tmp_path / "mapped"
    assert_ok(run_cli(*TINY, *PROTOCOL, "--device-map", map_file, "--out-dir", out))
    assert_same_results(reference, out)
    model = json.loads((out / "experiment_manifest.json").read_text())["model"]
    assert model["hf_device_map"] == CPU_MAP


def test_device_map_values_are_checked(tmp_path):
    assert resolve_device_map(None) is None
    assert resolve_device_map("balanced") == "balanced"
    good = tmp_path / "good.json"
    good.write_text(json.dumps(CPU_MAP))
    assert resolve_device_map(str(good)) == CPU_MAP
    bad_cases = {"missing.json": None, "list.json": "[1, 2]", "disk.json": '{"model": "disk"}',
                 "gpu.json": json.dumps({"model": torch.cuda.device_count()}),
                 "word.json": '{"model": "moon"}', "broken.json": "{"}
    for name, text in bad_cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UserError):
            resolve_device_map(str(tmp_path / name))
    with pytest.raises(UserError):
        resolve_device_map("everywhere")


@pytest.mark.slow
def test_bad_device_map_exits_2_with_one_line(tmp_path):
    proc = run_cli(*TINY, "--device-map", tmp_path / "nowhere.json", "--out-dir", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_torchrun_environment_detection(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.join("cpu") == distributed.Ranks()
    distributed.leave()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not distributed.join("cpu").distributed  # a single process is not parallel
    distributed.leave()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="cannot be combined with torchrun"):
        config_from_argv(["--device-map", "auto", "--device", "cpu"])
    assert distributed.current() == distributed.Ranks()
    group = distributed.Ranks(rank=1, world_size=3, local_rank=1, backend="gloo")
    assert list(group.my_batches(8)) == [1, 4, 7] and not group.is_main
    assert group.describe() == {"rank": 1, "world_size": 3, "local_rank": 1, "backend": "gloo"}
