#!/usr/bin/env bash
# GPU check: the benchmark and a short end-to-end protocol on a randomly initialised
# Llama-3.1-8B-shaped model in bfloat16, on one CUDA GPU, in well under 8 minutes.
#
#   bash scripts/gpu_check.sh            # outputs under $OUT if set, else results/gpu_check
#   bash scripts/gpu_check.sh --smoke    # the same steps on the CPU with a tiny model: checks this
#                                        # script itself on a machine without a GPU
#
# Installs nothing and needs no network: it runs the machine's own python (python3, or $PYTHON)
# with torch and transformers already installed, and sets only PYTHONPATH (to this tree).
# Random presets use a tokenizer trained on the bundled corpus, so no model package is needed.
#
# Steps (each under its own time limit, so a hang shows up as a failure, not a stall):
#   1. environment: python packages, CUDA GPU, versions
#   2. benchmark:   scripts/benchmark.py, batch 8 x 512 (Hutchinson: batch 1, whole model, or
#                   block mode if that runs out of GPU memory)
#   2b. curvature:  hutchinson_diag on a small model on the device: moments in host memory give
#                   the device-moment estimate bit for bit, finite differences run next to the
#                   double backward, --hutchinson-samples auto states its probes (step 2 times
#                   both HVPs on the 8B shape: --hutchinson-hvp auto)
#   2c. recomputed: the benchmark again with --gradient-checkpointing for the gradient metrics
#                   and Hutchinson by finite differences at batch 8 x 512 (peaks, ratios)
#   3. protocol:    grad_x_weight, K=500 per layer, sign_flip vs random_k,bottom_k, seeds 0,1,2,
#                   stability check, 50 blocks of 512 tokens per side
#   4. sharded:     with more than one GPU, the benchmark with the model sharded over all of them
#                   (torchrun --shard, FSDP2)
# Exit status 0 only if every step succeeded; the summary at the end names the failed steps.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$ROOT/results/gpu_check}"
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
MODEL="random:llama-3.1-8b"; DEVICE=cuda; DTYPE=bfloat16; BATCH=8; LENGTH=512; SAMPLES=50
TOPK=500; BENCH_LIMIT_S=330; PROTOCOL_LIMIT_S=240
if [ "${1:-}" = "--smoke" ]; then
    MODEL="random:tiny-llama"; DEVICE=cpu; DTYPE=float32; BATCH=2; LENGTH=32; SAMPLES=4; TOPK=5
elif [ -n "${1:-}" ]; then
    echo "usage: bash scripts/gpu_check.sh [--smoke]" >&2; exit 2
fi

say() { printf '[gpu_check] %s\n' "$*"; }
die() { printf '[gpu_check] FAILED: %s\n' "$*" >&2; exit 1; }

[ -n "$PY" ] || die "no python3 (or python) on PATH; set PYTHON=/path/to/python"
[ -f "$ROOT/phase1_runner_enhanced.py" ] || die "run this from the project tree ($ROOT has no phase1_runner_enhanced.py)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR" || die "cannot create the output folder $OUT_DIR"
cd "$ROOT"
limited() {  # limited SECONDS COMMAND...: run under a time limit when coreutils timeout exists
    local seconds=$1; shift
    if command -v timeout >/dev/null 2>&1; then
        timeout --signal=TERM --kill-after=20 "$seconds" "$@"
    else
        "$@"
    fi
}
START=$(date +%s)

# ----------------------------------------------------------------------------- 1. environment
say "python: $PY; project: $ROOT; outputs: $OUT_DIR"
"$PY" - "$DEVICE" <<'EOF' || die "environment check failed (see the message above); this script installs nothing"
import importlib.util, sys
needed = ["torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "scipy", "tqdm"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing python packages on this machine: {', '.join(missing)}")
import torch, transformers
if sys.argv[1] == "cpu":
    print(f"[gpu_check] smoke test on the CPU: torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
free, total = torch.cuda.mem_get_info()
print(f"[gpu_check] torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}, "
      f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
EOF
TREE_KIB=$(du -sk --exclude=.git --exclude=results "$ROOT" 2>/dev/null | cut -f1 || echo 0)
say "project tree (without .git and results): ${TREE_KIB} KiB"
[ "$TREE_KIB" -lt $((64 * 1024)) ] || die "the project tree is over 64 MiB; remove large untracked files"

FAILED=()

# ----------------------------------------------------------------------------- 2. benchmark
say "benchmark: $MODEL, $DTYPE, batch $BATCH x $LENGTH, 3 timed batches (limit ${BENCH_LIMIT_S}s)"
if ! limited "$BENCH_LIMIT_S" "$PY" scripts/benchmark.py --model "$MODEL" \
        --dtype "$DTYPE" --device "$DEVICE" --batch-size "$BATCH" --max-length "$LENGTH" \
        --steps 3 --topk "$TOPK" \
        --hutchinson-mode auto --hutchinson-batch-size 1 --json "$OUT_DIR/benchmark.json" \
        2>&1 | tee "$OUT_DIR/benchmark.txt"; then
    FAILED+=("benchmark (exit ${PIPESTATUS[0]}; 124 = time limit; see $OUT_DIR/benchmark.txt)")
fi

# ----------------------------------------------------------------------------- 2b. curvature
say "curvature: hutchinson_diag moments on the device vs in host memory, HVPs, auto samples"
if ! limited 120 "$PY" - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT_DIR/curvature.txt"; then
import sys, time, torch
from src.data.loading import TokenBlocks
from src.models.loader import load_model
from src.sensitivity.eligibility import eligible_parameters
from src.sensitivity.hutchinson import HutchinsonSettings
from src.sensitivity.metrics import compute_scores
from src.sensitivity.scoring import ScoringJob

model = load_model("random:tiny-llama", device=sys.argv[1], dtype="float32")[0]
vocab = model.get_input_embeddings().num_embeddings
ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
blocks, params = TokenBlocks(ids, torch.ones_like(ids)), eligible_parameters(model)

def scored(**settings):
    job = ScoringJob(model, params, blocks, batch_size=2, seed=0, topk=50,
                     settings={HutchinsonSettings: HutchinsonSettings(**settings)})
    started = time.perf_counter()
    out = compute_scores(job, "hutchinson_diag")
    return out, time.perf_counter() - started

def relative(a, b):
    num = sum(float((a[n].cpu() - b[n].cpu()).double().norm()) ** 2 for n in b) ** 0.5
    return num / sum(float(b[n].cpu().double().norm()) ** 2 for n in b) ** 0.5

on_device, t_device = scored(hutchinson_samples=4, hutchinson_moments="device")
on_host, t_host = scored(hutchinson_samples=4, hutchinson_moments="host")
assert next(iter(on_host.scores.values())).device.type == "cpu"
same = all(torch.equal(on_device.scores[n].cpu(), on_host.scores[n]) and
           torch.equal(on_device.extra["stderr"][n].cpu(), on_host.extra["stderr"][n])
           for n in params)
print(f"[gpu_check] moments on the device {t_device:.2f} s, in host memory {t_host:.2f} s; "
      f"identical estimates and standard errors: {same}")
fd, t_fd = scored(hutchinson_samples=4, hutchinson_hvp="finite_difference")
error = relative(fd.scores, on_device.scores)
finite = all(bool(torch.isfinite(s).all()) for s in fd.scores.values())
print(f"[gpu_check] finite differences vs double backward, same probes: relative difference "
      f"{error:.2e} (per-tensor steps add zero-mean cross terms; {t_fd:.2f} s)")
auto, t_auto = scored(hutchinson_samples="auto", hutchinson_max_samples=8)
print(f"[gpu_check] --hutchinson-samples auto: {auto.facts} ({t_auto:.2f} s)")
sys.exit(0 if same and finite and auto.facts["probes_per_batch"] % 4 == 0 else 1)
EOF
    FAILED+=("curvature (see $OUT_DIR/curvature.txt)")
fi

# ----------------------------------------------------------------------------- 2c. recomputed
# The memory-lean configuration: gradient metrics with --gradient-checkpointing at batch
# 8 x 512 (estimated 47-54 GB on llama-3.1-8b) and Hutchinson by finite differences at the same
# batch, moments where auto puts them (host memory at 8B): peaks and ratios to fwd+bwd.
say "recomputed: gradient checkpointing, finite-difference Hutchinson at batch $BATCH (limit ${BENCH_LIMIT_S}s)"
if ! limited "$BENCH_LIMIT_S" "$PY" scripts/benchmark.py --model "$MODEL" \
        --dtype "$DTYPE" --device "$DEVICE" --batch-size "$BATCH" --max-length "$LENGTH" \
        --steps 2 --repeats 1 --metrics grad_x_weight,grad_squared,hutchinson_diag \
        --gradient-checkpointing --hutchinson-hvp finite_difference --hutchinson-mode whole \
        --hutchinson-batch-size "$BATCH" --json "$OUT_DIR/benchmark_recomputed.json" \
        2>&1 | tee "$OUT_DIR/benchmark_recomputed.txt"; then
    FAILED+=("recomputed benchmark (exit ${PIPESTATUS[0]}; see $OUT_DIR/benchmark_recomputed.txt)")
fi

# ----------------------------------------------------------------------------- 3. protocol
# 50 blocks of 512 tokens per side need ~51k tokens; the bundled corpus has ~11k under the
# random presets' tokenizer, so the calibration/evaluation text is its sentences reshuffled
# (deterministically) into more documents. Content does not matter for a random model's speed.
CORPUS="$OUT_DIR/protocol_corpus.txt"
"$PY" - "$CORPUS" <<'EOF' || die "could not write the protocol corpus"
import random, re, sys
from src.data.loading import bundled_documents
sentences = [s for d in bundled_documents() for s in re.split(r"(?<=[.!?])\s+", d) if s]
rng, documents = random.Random(0), []
for _ in range(6):
    rng.shuffle(sentences)
    documents += [" ".join(sentences[i:i + 12]) for i in range(0, len(sentences), 12)]
open(sys.argv[1], "w", encoding="utf-8").write("\n\n".join(documents) + "\n")
EOF
PROTOCOL_DIR="$OUT_DIR/protocol"
rm -rf "$PROTOCOL_DIR"
say "protocol: grad_x_weight, K=$TOPK per_tensor, sign_flip, random_k+bottom_k, seeds 0,1,2, stability (limit ${PROTOCOL_LIMIT_S}s)"
if ! limited "$PROTOCOL_LIMIT_S" "$PY" phase1_runner_enhanced.py --model "$MODEL" \
        --dtype "$DTYPE" --device "$DEVICE" --data-file "$CORPUS" --max-samples "$SAMPLES" \
        --max-length "$LENGTH" --metric grad_x_weight --topk "$TOPK" --mode per_tensor --perturb sign_flip \
        --controls random_k,bottom_k --seeds 0,1,2 --stability-check \
        --out-dir "$PROTOCOL_DIR" 2>&1 | tee "$OUT_DIR/protocol.txt"; then
    FAILED+=("protocol (exit ${PIPESTATUS[0]}; 124 = time limit; see $OUT_DIR/protocol.txt)")
fi
if [ -f "$PROTOCOL_DIR/experiment_manifest.json" ]; then
    "$PY" - "$PROTOCOL_DIR/experiment_manifest.json" <<'EOF' | tee "$OUT_DIR/protocol_timings.txt" || true
import json, sys
manifest = json.load(open(sys.argv[1]))
steps = manifest["timings_seconds"]
after_build = sum(v for k, v in steps.items() if k != "load_model")
data = manifest["data"]
print(f"[gpu_check] protocol steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
print(f"[gpu_check] protocol after the model is built: {after_build:.1f} s "
      f"({data['calibration']['blocks']} calibration / {data['evaluation']['blocks']} evaluation "
      f"blocks); success={manifest['success']}")
EOF
fi

# ----------------------------------------------------------------------------- 4. sharded
# With more than one GPU visible (--smoke: 2 CPU processes), the benchmark again with the model
# sharded over every GPU (torchrun, FSDP2): forward, forward+backward, scoring and evaluation.
if [ "$DEVICE" = cpu ]; then N_SHARDS=2; else
    N_SHARDS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0); fi
if [ "$N_SHARDS" -gt 1 ]; then
    say "sharded benchmark: $MODEL over $N_SHARDS processes (limit ${BENCH_LIMIT_S}s)"
    if ! OMP_NUM_THREADS=1 limited "$BENCH_LIMIT_S" "$PY" -m torch.distributed.run \
            --nproc-per-node "$N_SHARDS" --master-addr 127.0.0.1 --master-port 29517 \
            scripts/benchmark.py --model "$MODEL" --dtype "$DTYPE" --device "$DEVICE" \
            --batch-size "$BATCH" --max-length "$LENGTH" --steps 3 --shard \
            --metrics grad_x_weight,act_mag,magnitude --json "$OUT_DIR/benchmark_sharded.json" \
            2>&1 | tee "$OUT_DIR/benchmark_sharded.txt"; then
        FAILED+=("sharded benchmark (exit ${PIPESTATUS[0]}; see $OUT_DIR/benchmark_sharded.txt)")
    fi
else
    say "sharded benchmark: skipped (one GPU visible)"
fi

# ----------------------------------------------------------------------------- summary
ELAPSED=$(( $(date +%s) - START ))
say "total wall time: ${ELAPSED}s; outputs in $OUT_DIR"
if [ "${#FAILED[@]}" -gt 0 ]; then
    for step in "${FAILED[@]}"; do printf '[gpu_check] FAILED: %s\n' "$step" >&2; done
    exit 1
fi
say "all steps passed"
