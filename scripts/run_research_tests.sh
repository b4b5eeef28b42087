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
# Each phase is a bundled study file, scripts/studies/<phase>.yaml, run with the study runner
# (python -m src.study run; src/study/): its runs are validated before any starts, scores are
# computed once per metric and shared, and a suite cut short resumes where it stopped when it is
# run again with the same CWA_RESULTS_DIR and CWA_SUITE_NAME.
#
# Environment: CWA_PYTHON (interpreter, default python), CWA_MODEL (model of the built-in phases,
# default the built-in smollm2-135m), CWA_RESULTS_DIR (default results), CWA_DEVICE (default auto),
# CWA_MAX_SAMPLES (calibration and evaluation blocks of the built-in phases, default 4),
# CWA_SUITE_NAME (default suite_<time>), LLAMA_MODEL (default meta-llama/Llama-3.1-8B),
# MISTRAL_MODEL (default mistralai/Mistral-7B-v0.1).
# Phases go to $CWA_RESULTS_DIR/<suite>/<phase>/ (study folders: runs/<id>/, study.csv, report/)
# with the study's console log as <phase>.log. A run passes when its manifest records success.
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
SUITE_DIR="$RESULTS_DIR/${CWA_SUITE_NAME:-suite_$(date +%Y%m%d_%H%M%S)}"
export PYTHONUNBUFFERED=1  # live progress through the tee

passed=0; failed=0; skipped=0
failed_runs=(); skipped_runs=()

indent() {  # line by line, so progress shows as it happens
    local line
    while IFS= read -r line || [ -n "$line" ]; do printf '    %s\n' "$line"; done
}

run_study() {  # run_study PHASE STUDY_FILE --set ... : one study into $SUITE_DIR/PHASE
    local phase="$1" study="$2"; shift 2
    local out="$SUITE_DIR/$phase"
    mkdir -p "$SUITE_DIR"
    echo "=== [$phase] $PY -m src.study run $study --out $out $*"
    local start=$SECONDS
    "$PY" -m src.study run "$study" --out "$out" "$@" 2>&1 | tee "$out.log" | indent
    local status=${PIPESTATUS[0]}
    local done_runs other_runs
    done_runs=$(grep -cE '^  [0-9a-f]{12}  done ' "$out.log")
    other_runs=$(grep -cE '^  [0-9a-f]{12}  (running|failed|pending) ' "$out.log")
    passed=$((passed + done_runs))
    if [ "$status" -eq 0 ] && [ "$other_runs" -eq 0 ] && [ "$done_runs" -gt 0 ]; then
        echo "--- PASS [$phase] $done_runs run(s) ($((SECONDS - start)) s)"
        return
    fi
    [ "$other_runs" -gt 0 ] || other_runs=1  # the study itself stopped (bad input, a crash)
    failed=$((failed + other_runs))
    failed_runs+=("$phase: $other_runs run(s) not done (exit $status, log $out.log)")
    echo "--- FAIL [$phase] $done_runs done, $other_runs not done: exit status $status" \
         "($((SECONDS - start)) s), log $out.log"
}

phase_builtin() {  # phase_builtin PHASE : its study file on the built-in phases' settings
    run_study "$1" "scripts/studies/$1.yaml" --set "model=$MODEL" --set "device=$DEVICE" \
        --set "max-samples=${CWA_MAX_SAMPLES:-4}"
}

skip_case() {  # skip_case PHASE NAME REASON
    skipped=$((skipped + 1))
    skipped_runs+=("$1/$2: $3")
    echo "--- SKIP [$1] $2: $3"
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
    run_study "$phase" scripts/studies/hub-model.yaml --set "model=$model" --set "device=$DEVICE"
}

run_phase() {
    echo "##### phase $1"
    case "$1" in
        llama) phase_hub_model llama "${LLAMA_MODEL:-meta-llama/Llama-3.1-8B}" ;;
        mistral) phase_hub_model mistral "${MISTRAL_MODEL:-mistralai/Mistral-7B-v0.1}" ;;
        *) phase_builtin "$1" ;;
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
    echo "report of every run: $PY scripts/generate_research_report.py --input-dirs $SUITE_DIR" \
         "--output $SUITE_DIR/report --format md,html (each phase has its own in <phase>/report/)"
fi
[ $failed -eq 0 ]
