#!/usr/bin/env bash
# sftune against TRL 1.16 on one GPU (H100/H200), offline, in under 10 minutes.
#
# Needs bench/wheels/ filled beforehand by bench/fetch_gpu_wheels.sh on a machine with PyPI access (the GPU
# machine needs no internet). Installs into .venv-gpu from those wheels only (--no-index), or uses .venv-gpu /
# $PY as they are when sftune, trl and a CUDA torch already import there.
#
# The comparison: bench/compare_trl.py on a Qwen2.5-0.5B-shaped model (24 layers, hidden 896, random weights,
# SmolLM2's 49,152-token vocabulary), bf16, flash_attention_2 when flash-attn imports (else sdpa; or set ATTN),
# 2,000 chit-chat conversations, max_length 1024, scenarios a (loss on all tokens), e (TRL: padding-free
# packing; sftune: padding_free on flash, group_by_length on sdpa) and eg (TRL: group_by_length), 1 run each
# (RUNS=2 for medians of alternating runs, ~12 min); then TRL's fastest (e) with use_liger_kernel, when
# liger-kernel is installed, for both tools (sftune: Liger's layer kernels; its own chunked loss stays).
# Reports, per tool: trained tokens/s, MFU (model FLOPs 6N per trained token against --peak-tflops, 989 for
# H100/H200 SXM bf16 dense) and peak GPU memory (torch.cuda.max_memory_allocated), with ratios sftune/TRL, and the
# precision both ran in (bf16-mixed: fp32 master weights, bf16 autocast; PRECISION=pure-bf16 for bf16 weights).
# Then bench/precision.py: sftune's precisions side by side (tokens/s, peak memory, weights that moved).
#
#   bench/gpu_check.sh                      # on the GPU machine
#   bench/gpu_check.sh --dry                # same code path on CPU: tiny model, fp32, 16 conversations (~2-3 min)
#   PEAK_TFLOPS=989 BATCH=8 RUNS=2 SCENARIOS=a,e,eg bench/gpu_check.sh
# Results: bench/gpu_results/ (results.md, results.json, run logs).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; fi
WHEELS=bench/wheels
OUT=${OUT_DIR:-bench/gpu_results}
VENV=${VENV:-.venv-gpu}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
BATCH=${BATCH:-8}
RUNS=${RUNS:-1}
SCENARIOS=${SCENARIOS:-a,e,eg}
mkdir -p "$OUT"

ready() { "$1" -c "import sftune, trl, torch" 2>/dev/null; }
if [ -n "${PY:-}" ] && ready "$PY"; then
    :
elif [ $DRY = 1 ] && ready .venv/bin/python; then
    PY=.venv/bin/python  # the CPU development environment
elif ready "$VENV/bin/python"; then
    PY=$VENV/bin/python
else
    [ -d "$WHEELS" ] || { echo "no $WHEELS: run bench/fetch_gpu_wheels.sh on a machine with PyPI access first" >&2; exit 2; }
    python3 -m venv --system-site-packages "$VENV"  # a CUDA torch already on the machine is reused
    PY=$VENV/bin/python
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" -e ".[bench,kahan]"
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" liger-kernel || echo "liger-kernel: no wheel, skipped"
fi

INPUTS=()
if [ -f "$WHEELS/inputs/conversations.jsonl" ]; then INPUTS=(--inputs "$WHEELS/inputs"); fi
if [ $DRY = 1 ]; then
    COMMON=(--device cpu --dtype float32 --model-config tiny --conversations 16 --max-length 128 --runs 1
            --scenarios a,e --threads 1)
else
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print(torch.cuda.get_device_name(0), torch.version.cuda)"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
    ATTN=${ATTN:-$("$PY" -c "import flash_attn" 2>/dev/null && echo flash_attention_2 || echo sdpa)}
    COMMON=(--device cuda --dtype bfloat16 --model-config qwen2.5-0.5b --conversations 2000 --max-length 1024
            --runs "$RUNS" --scenarios "$SCENARIOS" --batch-size "$BATCH" --peak-tflops "$PEAK_TFLOPS" --threads 8
            --attn "$ATTN" --precision "${PRECISION:-bf16-mixed}")
fi
# 9 minutes at most for the main comparison; the Liger run only when time and the package allow
timeout 540 "$PY" bench/compare_trl.py "${COMMON[@]}" "${INPUTS[@]}" --workdir "$OUT/work" \
    --markdown "$OUT/results.md" --json "$OUT/results.json"
if [ $DRY = 0 ] && "$PY" -c "import liger_kernel" 2>/dev/null; then
    timeout 240 "$PY" bench/compare_trl.py "${COMMON[@]}" "${INPUTS[@]}" --scenarios e --runs 1 --liger \
        --workdir "$OUT/work-liger" --markdown "$OUT/results-liger.md" --json "$OUT/results-liger.json" || true
fi
# each precision of sftune side by side (fp32, bf16 mixed, pure bf16, bf16 weights + Kahan AdamW): 4 minutes at most
if [ $DRY = 1 ]; then
    PRECISION_ARGS=(--device cpu --model-config tiny --steps 4 --batch-size 1 --max-length 64 --threads 1)
else
    PRECISION_ARGS=(--device cuda --model-config qwen2.5-0.5b --steps 30 --batch-size "$BATCH" --max-length 1024
                    --threads 8 --attn "$ATTN")
fi
timeout 240 "$PY" bench/precision.py "${PRECISION_ARGS[@]}" "${INPUTS[@]}" --workdir "$OUT/work-precision" \
    --markdown "$OUT/results-precision.md" --json "$OUT/results-precision.json" || true
echo "results: $OUT/results.md, $OUT/results-precision.md"
