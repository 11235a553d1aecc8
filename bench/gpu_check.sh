#!/usr/bin/env bash
# The GPU check of issues 8 and 19: paper-scale stage-1 and stage-2 training steps on one GPU (random weights and
# inputs) with our settings and upstream's, stages 3, 5 and 6 (bench/decode_step.py), one process per setting, each
# under `timeout`; at most about 8 minutes (BUDGET_S). Speed ratios to upstream's step: $OUT/gpu_ratios.json.
#
#   bash bench/gpu_check.sh            # results: $OUT/gpu_bench.jsonl (one JSON line per setting), $OUT/gpu_bench.err
#
# Needs no network and installs nothing into the environment: it uses whatever `python3` has, plus pure-Python
# wheels carried in data/wheels. Needed: torch with CUDA and einops (where it is missing, data/wheels/einops-*.whl is
# put on PYTHONPATH). Optional: numpy (else the bench builds AdamW itself); transformers (stage 2's GPT-2 caption
# head, without it stage 2 runs without that head and its JSON says "caption_head": false; and the decode benches);
# diffusers (the decode benches; where it is missing, data/wheels/diffusers-*.whl and importlib_metadata-*.whl are
# unpacked into a temporary folder; without them those settings are skipped); bitsandbytes (the 8-bit AdamW setting;
# where it is not installed, an unpacked copy in data/pydeps/ is used if present, else the setting is skipped).
# data/ is git-ignored: carry data/wheels and data/pydeps to the GPU machine (docs/scale.md says how to make them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
RESULTS="$OUT/gpu_bench.jsonl"
ERRORS="$OUT/gpu_bench.err"
: > "$RESULTS"
: > "$ERRORS"
BUDGET_S="${BUDGET_S:-480}"  # no setting starts that could end after this (the whole check must end within 9 min)
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
if ! "$PY" -c 'import diffusers' 2>/dev/null && ls data/wheels/diffusers-*.whl >/dev/null 2>&1; then
  # pure-Python wheels carried in data/wheels (diffusers, importlib_metadata): unpacked into a temporary folder
  site="${TMPDIR:-/tmp}/gpu_check_site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      data/wheels/diffusers-*.whl data/wheels/importlib_metadata-*.whl >>"$ERRORS" 2>&1; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "diffusers from data/wheels"
  fi
fi
if ! "$PY" -c 'import bitsandbytes' 2>/dev/null && [[ -d data/pydeps/bitsandbytes ]]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/data/pydeps"  # last: installed packages win
  echo "bitsandbytes from data/pydeps"
fi
for pkg in einops numpy transformers diffusers bitsandbytes; do
  "$PY" -c "import $pkg; print('$pkg', getattr($pkg, '__version__', '?'))" 2>/dev/null || echo "$pkg: not installed"
done
HAVE_BNB=0
"$PY" -c 'import bitsandbytes' 2>/dev/null && HAVE_BNB=1

# name | timeout (s) | script and arguments; in priority order (the budget cuts the tail). Stage 2 at batch 10 with
# the condition cache is issue 19's 24 GiB goal; the *_upstream settings are upstream's step (image tower on the frames
# every step, fp16, no cache), the baselines of the speed ratios in gpu_ratios.json.
SETTINGS=(
  "s2_bf16_ckpt_fused_cache|100|train_step.py --stage 2 --batch 10 --bf16 --grad-ckpt --adamw fused --cond-cache"
  "s1_bf16_ckpt_fused|90|train_step.py --stage 1 --batch 120 --bf16 --grad-ckpt --adamw fused"
  "s1_upstream|90|train_step.py --stage 1 --batch 120 --upstream-baseline"
  "s2_upstream|100|train_step.py --stage 2 --batch 10 --upstream-baseline"
  "s2_bf16_ckpt_fused_cache_micro5|100|train_step.py --stage 2 --batch 10 --bf16 --grad-ckpt --adamw fused --cond-cache --micro-batch 5"
  "s2_bf16_cache|100|train_step.py --stage 2 --batch 10 --bf16 --adamw fused --cond-cache"
  "d3_paper|120|decode_step.py --stage 3 --clips 3"
  "d5_paper|150|decode_step.py --stage 5 --clips 2"
  "d6_paper_1200|200|decode_step.py --stage 6 --clips 1200"
  "s2_bf16_ckpt_fused|100|train_step.py --stage 2 --batch 10 --bf16 --grad-ckpt --adamw fused"
  "s1_bf16|90|train_step.py --stage 1 --batch 120 --bf16"
  "s1_bf16_ckpt_8bit|90|train_step.py --stage 1 --batch 120 --bf16 --grad-ckpt --adamw 8bit"
  "s1_fp32|90|train_step.py --stage 1 --batch 120"
  "s2_fp32|100|train_step.py --stage 2 --batch 10"
)
HAVE_DIFFUSERS=0
"$PY" -c 'import diffusers, transformers' 2>/dev/null && HAVE_DIFFUSERS=1
for entry in "${SETTINGS[@]}"; do
  IFS="|" read -r name limit cmd <<<"$entry"
  read -r script args <<<"$cmd"
  elapsed=$(( $(date +%s) - START ))
  if (( elapsed + limit > BUDGET_S )); then
    echo "{\"setting\": \"$name\", \"skipped\": \"time budget ($elapsed s used)\"}" | tee -a "$RESULTS"
    continue
  fi
  if [[ "$args" == *8bit* && $HAVE_BNB == 0 ]]; then
    echo "{\"setting\": \"$name\", \"skipped\": \"bitsandbytes not installed\"}" | tee -a "$RESULTS"
    continue
  fi
  if [[ "$script" == decode_step.py && $HAVE_DIFFUSERS == 0 ]]; then
    echo "{\"setting\": \"$name\", \"skipped\": \"diffusers or transformers not importable\"}" | tee -a "$RESULTS"
    continue
  fi
  if [[ "$script" == train_step.py ]]; then
    args="--profile $PROFILE --steps 10 --warmup 3 $args"
  elif [[ "$PROFILE" != paper ]]; then
    args="$args --shrink"  # the decode benches' dry run on a CPU
  fi
  echo "== $name: $script --device $DEVICE $args (timeout $limit s)"
  # shellcheck disable=SC2086
  timeout "$limit" "$PY" "bench/$script" --device "$DEVICE" $args >"$OUT/$name.json" 2>>"$ERRORS"
  rc=$?
  line=$(tail -1 "$OUT/$name.json")
  if [[ $rc -eq 0 && "$line" == \{* ]]; then
    echo "{\"setting\": \"$name\", ${line:1}" | tee -a "$RESULTS"
  else
    echo "{\"setting\": \"$name\", \"failed\": true, \"rc\": $rc}" | tee -a "$RESULTS"
    tail -3 "$ERRORS"
  fi
done
# speed ratios of our best settings to upstream's step, measured in this run on this device
"$PY" - "$RESULTS" >"$OUT/gpu_ratios.json" <<'PYEOF' || echo "no ratios" | tee -a "$ERRORS"
import json, sys
rows = {r["setting"]: r for r in map(json.loads, open(sys.argv[1])) if "sec_per_step" in r}
pairs = {"stage1": ("s1_bf16_ckpt_fused", "s1_upstream"), "stage2": ("s2_bf16_ckpt_fused_cache", "s2_upstream")}
out = {}
for stage, (ours, base) in pairs.items():
    if ours in rows and base in rows:
        out[stage] = {"ours": ours, "upstream": base, "speedup": round(rows[base]["sec_per_step"] / rows[ours]["sec_per_step"], 3),
                      "peak_mem_gib": {k: rows[k].get("peak_mem_gib") for k in (ours, base)}}
print(json.dumps(out))
PYEOF
cat "$OUT/gpu_ratios.json"
echo "== done in $(( $(date +%s) - START )) s; results in $RESULTS"
