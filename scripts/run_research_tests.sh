#!/usr/bin/env bash
# Research test suite: phases of real runs of phase1_runner_enhanced.py, a pass/fail/skip summary,
# and a non-zero exit status when any run failed.
#
#   scripts/run_research_tests.sh [validation|perturbation|multi-metric|faithfulness|faults|mediation|hutchinson|downstream|compression|llama|mistral|all]
#
# validation    does the method beat its controls? grad_x_weight top-K vs 20 random-K draws
#               (p-value can reach < 0.05), top-K stability over seeds and calibration parts, and
#               the random-score null metric (its top-K must look like random-K)
# perturbation  zero, sign_flip, gauss_noise and bit_flip of the same top-K, and zero at K=1/10/100
# multi-metric  every data-driven and data-free metric at the same K (overlap and damage compared)
# faithfulness  every metric's top-K damage over a K grid against the random-K band (zero), and
#               Taylor predictions of damage against measurements (--faithfulness)
# faults        hardware faults: 1000 single-bit upsets of the IEEE bits and of int8 codes (critical
#               rates per bit position with Wilson intervals), and the progressive bit search on
#               int8 codes up to 100x perplexity against random flips (--fault-injection, --bit-search)
# mediation     why the super weights matter: their activation restored (all, spike, first
#               positions), removed (zero, mean) against random channels, patched layer by layer,
#               attribution patching against exact patching, pair interactions (--mediation)
# hutchinson    hutchinson_diag (Hessian diagonal), whole model and block by block
# downstream    HellaSwag / LAMBADA accuracy (20 bundled items each) of the baseline and of every
#               perturbation condition
# compression   3- and 4-bit round-to-nearest of every weight except the top-100 (grad_x_weight,
#               act_mag), each against 3 random-100 kept sets: recovery of the quantization loss
# llama/mistral one run on $LLAMA_MODEL / $MISTRAL_MODEL (hub ids or local folders); skipped with
#               a clear line when the model cannot be loaded here (offline, gated, not cached)
#
# Environment: CWA_PYTHON (interpreter, default python), CWA_MODEL (model of the built-in phases,
# default the built-in smollm2-135m), CWA_RESULTS_DIR (default results), CWA_DEVICE (default auto),
# CWA_MAX_SAMPLES (calibration and evaluation blocks of the built-in phases, default 4),
# LLAMA_MODEL (default meta-llama/Llama-3.1-8B), MISTRAL_MODEL (default mistralai/Mistral-7B-v0.1).
# Runs go to $CWA_RESULTS_DIR/suite_<time>/<phase>/<run>/ with the console log next to each folder.
# A run passes when the CLI exits 0 and its manifest records success. The built-in phases score
# each metric once: the first run saves its scores, later runs of that metric use --scores-from.
set -uo pipefail

PHASES="validation perturbation multi-metric faithfulness faults mediation hutchinson downstream compression llama mistral"
usage() {
    echo "usage: $0 [${PHASES// /|}|all]" >&2
    exit 2
}

phase_arg="${1:-validation}"
case " $PHASES all " in
    *" $phase_arg "*) ;;
    *) echo "unknown phase '$phase_arg'" >&2; usage ;;
esac
[ $# -le 1 ] || usage

PY="${CWA_PYTHON:-python}"
MODEL="${CWA_MODEL:-smollm2-135m}"
DEVICE="${CWA_DEVICE:-auto}"
RESULTS_DIR="${CWA_RESULTS_DIR:-results}"
case "$RESULTS_DIR" in /*) ;; *) RESULTS_DIR="$PWD/$RESULTS_DIR" ;; esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
SUITE_DIR="$RESULTS_DIR/suite_$(date +%Y%m%d_%H%M%S)"
export PYTHONUNBUFFERED=1  # live progress through the tee

# Small but meaningful settings for a 2-core CPU (each phase a few minutes): 64-token blocks,
# 4 calibration and 4 evaluation blocks (252 evaluation tokens), global top-K. Raise
# CWA_MAX_SAMPLES on a GPU.
COMMON=(--model "$MODEL" --device "$DEVICE" --max-length 64 --max-samples "${CWA_MAX_SAMPLES:-4}"
        --batch-size 4)
SEEDS_20="$(seq -s, 0 19)"

passed=0; failed=0; skipped=0
failed_runs=(); skipped_runs=()

indent() {  # line by line, so progress shows as it happens
    local line
    while IFS= read -r line || [ -n "$line" ]; do printf '    %s\n' "$line"; done
}

run_case() {  # run_case PHASE NAME ARGS... : one CLI run into $SUITE_DIR/PHASE/NAME
    local phase="$1" name="$2"; shift 2
    local out="$SUITE_DIR/$phase/$name"
    mkdir -p "$SUITE_DIR/$phase"
    echo "=== [$phase] $name"
    echo "    $PY phase1_runner_enhanced.py $* --out-dir $out"
    local start=$SECONDS
    "$PY" phase1_runner_enhanced.py "$@" --out-dir "$out" 2>&1 | tee "$out.log" | indent
    local status=$?
    if [ $status -eq 0 ] && grep -q '"success": true' "$out/experiment_manifest.json" 2>/dev/null; then
        passed=$((passed + 1))
        echo "--- PASS [$phase] $name ($((SECONDS - start)) s)"
    else
        failed=$((failed + 1))
        failed_runs+=("$phase/$name (exit $status, log $out.log)")
        echo "--- FAIL [$phase] $name: exit status $status ($((SECONDS - start)) s), log $out.log"
    fi
}

# Scores are computed once per metric and suite: the first run with the COMMON settings saves
# them (--save-scores), later runs of that metric read them (--scores-from) instead of scoring.
declare -A SCORED_BY=()

run_scored() {  # run_scored PHASE NAME METRIC ARGS... : run_case with COMMON and shared scores
    local phase="$1" name="$2" metric="$3"; shift 3
    local source="${SCORED_BY[$metric]:-}"
    if [ -n "$source" ]; then
        run_case "$phase" "$name" "${COMMON[@]}" --metric "$metric" --scores-from "$source" "$@"
        return
    fi
    run_case "$phase" "$name" "${COMMON[@]}" --metric "$metric" --save-scores "$@"
    if grep -q '"success": true' "$SUITE_DIR/$phase/$name/experiment_manifest.json" 2>/dev/null; then
        SCORED_BY[$metric]="$SUITE_DIR/$phase/$name"
    fi
}

skip_case() {  # skip_case PHASE NAME REASON
    skipped=$((skipped + 1))
    skipped_runs+=("$1/$2: $3")
    echo "--- SKIP [$1] $2: $3"
}

phase_validation() {
    run_scored validation gxw_zero_k10_20seeds grad_x_weight --mode global \
        --topk 10 --perturb zero --seeds "$SEEDS_20" --save-plots
    run_scored validation gxw_stability_k10 grad_x_weight --mode global \
        --topk 10 --seeds 0,1,2 --stability-check --stability-batches 3 --save-plots
    run_scored validation random_null_k10 random --mode global --topk 10 \
        --perturb zero --seeds "$(seq -s, 0 9)" --save-plots
}

phase_perturbation() {
    local method
    for method in zero sign_flip gauss_noise bit_flip; do
        run_scored perturbation "gxw_${method}_k10" grad_x_weight \
            --mode global --topk 10 --perturb "$method" --seeds 0,1,2 --save-plots
    done
    local k
    for k in 1 100; do
        run_scored perturbation "gxw_zero_k$k" grad_x_weight --mode global \
            --topk "$k" --perturb zero --seeds 0,1,2 --save-plots
    done
}

phase_multi_metric() {
    local metric
    for metric in grad_x_weight grad_squared act_mag magnitude random; do
        run_scored multi-metric "${metric}_zero_k10" "$metric" \
            --mode global --topk 10 --perturb zero --seeds 0,1,2 --save-plots
    done
}

phase_faithfulness() {
    run_case faithfulness all_metrics_zero "${COMMON[@]}" --metric grad_x_weight --topk 10 \
        --mode global --perturb zero --seeds 0,1,2 --hutchinson-samples 4 --save-plots \
        --faithfulness grad_x_weight,grad_squared,fisher_w2,hutchinson_diag,obd,act_mag,magnitude,random \
        --faithfulness-sets 50
}

phase_faults() {
    run_scored faults upsets_native grad_x_weight --topk 10 --fault-injection 1000 \
        --fault-eval-samples 1 --save-plots
    run_scored faults upsets_and_search_int8 grad_x_weight --topk 10 --bit-format int8 \
        --fault-injection 1000 --fault-eval-samples 1 --bit-search 30 --save-plots
}

phase_mediation() {
    run_scored mediation super_weights grad_x_weight --topk 10 --super-weights --mediation \
        --save-plots
}

phase_hutchinson() {
    run_case hutchinson hutchinson_zero_k10 "${COMMON[@]}" --metric hutchinson_diag \
        --hutchinson-samples 2 --mode global --topk 10 --perturb zero --seeds 0,1,2 --save-plots
    run_case hutchinson hutchinson_block_k10 "${COMMON[@]}" --metric hutchinson_diag \
        --hutchinson-samples 2 --hutchinson-block --mode global --topk 10 --save-plots
}

phase_downstream() {
    if ! "$PY" phase1_runner_enhanced.py --help 2>/dev/null | grep -q -- "--downstream-tasks"; then
        skip_case downstream tasks "this version of phase1_runner_enhanced.py has no --downstream-tasks"
        return
    fi
    run_scored downstream gxw_zero_k10_tasks grad_x_weight --mode global \
        --topk 10 --perturb zero --seeds 0,1,2 --downstream-tasks hellaswag,lambada \
        --task-samples 20 --save-plots
}

phase_compression() {
    local bits metric
    for bits in 3 4; do
        for metric in grad_x_weight act_mag; do
            run_scored compression "${metric}_rtn${bits}_keep100" "$metric" \
                --mode global --topk 100 --quantize "$bits" --controls random_k --seeds 0,1,2 \
                --save-plots
        done
    done
}

# Exit status of the preflight: 0 loadable, 3 not loadable here (skip), anything else: broken.
PREFLIGHT='
import sys
from pathlib import Path
spec = sys.argv[1]
if Path(spec).expanduser().exists():
    raise SystemExit(0)
from transformers import AutoConfig
try:
    AutoConfig.from_pretrained(spec, local_files_only=True)
    raise SystemExit(0)
except OSError:
    pass
from src.utils.hub import hub_reachable
if not hub_reachable():
    print("the Hugging Face hub is unreachable (offline) and it is not in the local cache")
    raise SystemExit(3)
try:
    AutoConfig.from_pretrained(spec)
except Exception as error:
    print(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    raise SystemExit(3)
'

phase_hub_model() {  # phase_hub_model PHASE MODEL
    local phase="$1" model="$2" reason status
    reason="$("$PY" -c "$PREFLIGHT" "$model" 2>&1)"
    status=$?
    if [ $status -eq 3 ]; then
        skip_case "$phase" "$model" "cannot be loaded here: $reason"
        return
    elif [ $status -ne 0 ]; then
        failed=$((failed + 1))
        failed_runs+=("$phase/$model (preflight exit $status: ${reason:0:200})")
        echo "--- FAIL [$phase] $model: preflight exit status $status: ${reason:0:200}"
        return
    fi
    run_case "$phase" "$(basename "$model")_gxw_zero_k10" --model "$model" --device "$DEVICE" \
        --max-length 128 --max-samples 4 --batch-size 2 --metric grad_x_weight --mode global \
        --topk 10 --perturb zero --seeds 0,1,2 --save-plots
}

run_phase() {
    echo "##### phase $1"
    case "$1" in
        validation) phase_validation ;;
        perturbation) phase_perturbation ;;
        multi-metric) phase_multi_metric ;;
        faithfulness) phase_faithfulness ;;
        faults) phase_faults ;;
        mediation) phase_mediation ;;
        hutchinson) phase_hutchinson ;;
        downstream) phase_downstream ;;
        compression) phase_compression ;;
        llama) phase_hub_model llama "${LLAMA_MODEL:-meta-llama/Llama-3.1-8B}" ;;
        mistral) phase_hub_model mistral "${MISTRAL_MODEL:-mistralai/Mistral-7B-v0.1}" ;;
    esac
}

if [ "$phase_arg" = all ]; then
    for phase in $PHASES; do run_phase "$phase"; done
else
    run_phase "$phase_arg"
fi

echo
echo "##### summary: $passed passed, $failed failed, $skipped skipped ($SUITE_DIR)"
for item in "${failed_runs[@]+"${failed_runs[@]}"}"; do echo "  FAILED  $item"; done
for item in "${skipped_runs[@]+"${skipped_runs[@]}"}"; do echo "  SKIPPED $item"; done
if [ $passed -gt 0 ]; then
    echo "report: $PY scripts/generate_research_report.py --input-dirs $SUITE_DIR" \
         "--output $SUITE_DIR/report --format md,html"
fi
[ $failed -eq 0 ]
