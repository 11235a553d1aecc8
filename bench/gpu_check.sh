#!/usr/bin/env bash
# The GPU check of issue 8: paper-scale stage-1 and stage-2 training steps on one GPU (random weights and inputs),
# with and without the memory options, one process per setting, each under `timeout`; at most about 6 minutes.
#
#   bash bench/gpu_check.sh            # results: $OUT/gpu_bench.jsonl (one JSON line per setting), $OUT/gpu_bench.err
#
# Installs nothing and needs no network: it uses whatever `python3` has. Needed: torch with CUDA and einops (pure
# Python; where it is missing, a wheel at data/wheels/einops-*.whl is put on PYTHONPATH). Optional: numpy (else the
# bench builds AdamW itself), transformers (stage 2's GPT-2 caption head; without it stage 2 runs without that head
# and its JSON says "caption_head": false), bitsandbytes (the 8-bit AdamW setting; where it is not installed, an
# unpacked copy in data/pydeps/ is used if present, else the setting is skipped). data/ is git-ignored: carry
# data/wheels and data/pydeps to the GPU machine (docs/scale.md says how to make them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
RESULTS="$OUT/gpu_bench.jsonl"
ERRORS="$OUT/gpu_bench.err"
: > "$RESULTS"
: > "$ERRORS"
BUDGET_S="${BUDGET_S:-360}"  # start no new setting after this many seconds (the whole check must end within 9 min)
START=$(date +%s)
PY="${PYTHON:-python3}"
PROFILE="${PROFILE:-paper}"  # PROFILE=smoke DEVICE=cpu: a dry run of this script on a CPU
DEVICE="${DEVICE:-cuda}"

echo "== nvidia-smi"
nvidia-smi || echo "nvidia-smi failed"
echo "== python and packages"
"$PY" -c 'import sys; print(sys.version)'
if ! "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'; then
  echo "torch is not importable by $PY: nothing to benchmark (the check installs nothing)" | tee -a "$ERRORS"
  exit 1
fi
if [[ "$DEVICE" == cuda ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "torch sees no CUDA device: nothing to benchmark" | tee -a "$ERRORS"
  exit 1
fi
if ! "$PY" -c 'import einops' 2>/dev/null; then
  wheel=$(ls data/wheels/einops-*.whl 2>/dev/null | head -1)
  if [[ -n "$wheel" ]]; then
    export PYTHONPATH="$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}"
    echo "einops from $wheel"
  else
    echo "einops is missing and data/wheels/einops-*.whl is absent: the brain model cannot be built" | tee -a "$ERRORS"
    exit 1
  fi
fi
if ! "$PY" -c 'import bitsandbytes' 2>/dev/null && [[ -d data/pydeps/bitsandbytes ]]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/data/pydeps"  # last: installed packages win
  echo "bitsandbytes from data/pydeps"
fi
for pkg in einops numpy transformers bitsandbytes; do
  "$PY" -c "import $pkg; print('$pkg', getattr($pkg, '__version__', '?'))" 2>/dev/null || echo "$pkg: not installed"
done
HAVE_BNB=0
"$PY" -c 'import bitsandbytes' 2>/dev/null && HAVE_BNB=1

# name | timeout (s) | train_step.py arguments; in priority order (the budget may cut the tail).
SETTINGS=(
  "s1_fp32|90|--stage 1 --batch 120"
  "s1_bf16|90|--stage 1 --batch 120 --bf16"
  "s1_bf16_ckpt_fused|90|--stage 1 --batch 120 --bf16 --grad-ckpt --adamw fused"
  "s1_bf16_ckpt_8bit|90|--stage 1 --batch 120 --bf16 --grad-ckpt --adamw 8bit"
  "s2_fp32|120|--stage 2 --batch 10"
  "s2_bf16|120|--stage 2 --batch 10 --bf16"
  "s2_bf16_ckpt_fused|120|--stage 2 --batch 10 --bf16 --grad-ckpt --adamw fused"
  "s1_fp32_fused|90|--stage 1 --batch 120 --adamw fused"
  "s1_fp16|90|--stage 1 --batch 120 --precision fp16"
  "s1_tf32|90|--stage 1 --batch 120 --precision tf32"
  "s2_bf16_ckpt_fused_freeze_gpt2|120|--stage 2 --batch 10 --bf16 --grad-ckpt --adamw fused --freeze text_dec.decoder"
)
for entry in "${SETTINGS[@]}"; do
  IFS="|" read -r name limit args <<<"$entry"
  elapsed=$(( $(date +%s) - START ))
  if (( elapsed + limit > BUDGET_S )); then
    echo "{\"setting\": \"$name\", \"skipped\": \"time budget ($elapsed s used)\"}" | tee -a "$RESULTS"
    continue
  fi
  if [[ "$args" == *8bit* && $HAVE_BNB == 0 ]]; then
    echo "{\"setting\": \"$name\", \"skipped\": \"bitsandbytes not installed\"}" | tee -a "$RESULTS"
    continue
  fi
  echo "== $name: train_step.py --profile $PROFILE --device $DEVICE --steps 10 --warmup 3 $args (timeout $limit s)"
  # shellcheck disable=SC2086
  timeout "$limit" "$PY" bench/train_step.py --profile "$PROFILE" --device "$DEVICE" --steps 10 --warmup 3 $args \
    >"$OUT/$name.json" 2>>"$ERRORS"
  rc=$?
  line=$(tail -1 "$OUT/$name.json")
  if [[ $rc -eq 0 && "$line" == \{* ]]; then
    echo "{\"setting\": \"$name\", ${line:1}" | tee -a "$RESULTS"
  else
    echo "{\"setting\": \"$name\", \"failed\": true, \"rc\": $rc}" | tee -a "$RESULTS"
    tail -3 "$ERRORS"
  fi
done
echo "== done in $(( $(date +%s) - START )) s; results in $RESULTS"
