#!/usr/bin/env bash
# NEURONS driver: runs the selected stages in their fixed order, stops at the first failure.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VALID_MODES="enhance motion"

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$HERE/.venv/bin/python" ]]; then
  PY="$HERE/.venv/bin/python"
else
  PY="python3"
fi
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

# The stage table (utils/stages.py): key, script, multi-process (1/0) and name of each stage, in the fixed order.
STAGE_TABLE="$("$PY" -m utils.stages table)" || { echo "error: cannot read the stage table with $PY" >&2; exit 2; }
VALID_STAGES=""
MULTI_DEVICE_STAGES=""  # stages that shard their work over accelerate processes
declare -A STAGE_SCRIPT STAGE_NAME
while IFS=$'\t' read -r key script multi name; do
  VALID_STAGES+="$key"
  STAGE_SCRIPT[$key]="$script"
  STAGE_NAME[$key]="$name"
  if [[ "$multi" == 1 ]]; then MULTI_DEVICE_STAGES+="$key"; fi
done <<<"$STAGE_TABLE"
VALID_PROFILES="$("$PY" -m utils.stages profiles)"  # the built-in profiles, configs/<name>.yaml
PROFILE_LIST="${VALID_PROFILES// /, }"

usage() {
  cat <<EOF
usage: bash train_neurons.sh GPU EXP STAGES MODE SUBJ [PROFILE]

  GPU      cpu, one device index (0) or a list (0,1,2,3); a list runs multi-device stages ($MULTI_DEVICE_STAGES)
           with 'accelerate launch --num_processes N'
  EXP      experiment name; outputs go to <exp_root>/exp_<EXP>/subj_<SUBJ>/ (exp_root: EXP by default)
  STAGES   any of the characters '$VALID_STAGES', run in that fixed order:
$(for ((i = 0; i < ${#VALID_STAGES}; i++)); do k="${VALID_STAGES:i:1}"; echo "             $k  ${STAGE_NAME[$k]} (${STAGE_SCRIPT[$k]})"; done)
  MODE     enhance or motion
  SUBJ     1, 2 or 3, or a subject set such as 1,2,3 (stages 1-2 train one model with a ridge per subject)
  PROFILE  $PROFILE_LIST (default paper), or a path to a YAML profile

examples:
  bash train_neurons.sh 0 neurons 123456 enhance 1            # the paper, one GPU
  bash train_neurons.sh cpu demo 123456 enhance 1 toy         # the toy cortex world on the CPU
  bash train_neurons.sh 0 upstream 123456 enhance 1 paper_upstream  # the paper as the upstream code ran it
environment: PYTHON (interpreter, default .venv/bin/python if present), NEURONS_SET (extra '--set' overrides,
  passed to every stage; prefix a key with stage<k>. to aim it at one stage). Overrides are separated by spaces
  and quoted as in a shell when one holds spaces, e.g.
  NEURONS_SET="run.seed=1 stage1.train.num_epochs=2 'stage5.video.prompt_suffix=, 8k uhd'"
EOF
}

die() {  # one-line error, exit status 2
  echo "error: $1" >&2
  exit 2
}

free_port() {  # a TCP port the OS reports free now, for the launcher's rendezvous
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
if [[ $# -lt 5 || $# -gt 6 ]]; then
  die "expected 5 or 6 arguments (GPU EXP STAGES MODE SUBJ [PROFILE]), got $#; see bash train_neurons.sh -h"
fi

GPU="$1"; EXP="$2"; STAGES="$3"; MODE="$4"; SUBJ="$5"; PROFILE="${6:-paper}"

if [[ "$GPU" != "cpu" && ! "$GPU" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die "bad GPU '$GPU'; valid: cpu, one index (0) or a comma-separated list (0,1,2,3)"
fi
if [[ ! "$EXP" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
  die "bad EXP '$EXP'; valid: letters, digits, '.', '_' and '-', starting with a letter or digit"
fi
if [[ -z "$STAGES" || ! "$STAGES" =~ ^[$VALID_STAGES]+$ ]]; then
  bad="$(echo "$STAGES" | tr -d "$VALID_STAGES")"
  die "bad STAGES '$STAGES' (unknown: '${bad}'); valid characters: $(sed 's/./& /g; s/ $//' <<<"$VALID_STAGES")"
fi
if [[ " $VALID_MODES " != *" $MODE "* ]]; then
  die "bad MODE '$MODE'; valid: enhance, motion"
fi
if [[ ! "$SUBJ" =~ ^[123](,[123])*$ ]]; then
  die "bad SUBJ '$SUBJ'; valid: 1, 2, 3, or a subject set such as 1,2,3"
fi
if [[ " $VALID_PROFILES " != *" $PROFILE "* ]]; then
  if [[ "$PROFILE" != *.yaml && "$PROFILE" != *.yml ]]; then
    die "bad PROFILE '$PROFILE'; valid: $PROFILE_LIST, or a path to a .yaml file"
  fi
  [[ -f "$PROFILE" ]] || die "bad PROFILE '$PROFILE': file not found; valid: $PROFILE_LIST, or an existing .yaml file"
  PROFILE="$(cd "$(dirname "$PROFILE")" && pwd)/$(basename "$PROFILE")"
fi

# Stages in the fixed order, each requested one checked before anything runs.
SELECTED=()
for ((i = 0; i < ${#VALID_STAGES}; i++)); do
  k="${VALID_STAGES:i:1}"
  if [[ "$STAGES" == *"$k"* ]]; then
    [[ -f "$HERE/${STAGE_SCRIPT[$k]}" ]] || die "stage $k (${STAGE_NAME[$k]}) is not available in this checkout: $HERE/${STAGE_SCRIPT[$k]} is missing"
    SELECTED+=("$k")
  fi
done

SET_ARGS=()
OVERRIDES="$("$PY" -m utils.stages overrides "${NEURONS_SET:-}")" || exit 2  # shell-style words, one a line
while IFS= read -r item; do
  if [[ -n "$item" ]]; then SET_ARGS+=(--set "$item"); fi
done <<<"$OVERRIDES"
NUM_PROC=1
if [[ "$GPU" == "cpu" ]]; then
  export CUDA_VISIBLE_DEVICES=""
  SET_ARGS+=(--set run.device=cpu)
else
  export CUDA_VISIBLE_DEVICES="$GPU"
  SET_ARGS+=(--set run.device=cuda)  # a stage refuses at once (one line, exit 2) where CUDA is absent
  NUM_PROC=$(( $(tr -cd ',' <<<"$GPU" | wc -c) + 1 ))
fi

# The run folder comes from the resolved config (exp_root may be overridden by the profile or NEURONS_SET).
RUN_DIR="$("$PY" -c 'import sys; from utils.cli import run_dir_of; print(run_dir_of(sys.argv[1:]))' \
  --profile "$PROFILE" --subj "$SUBJ" --exp "$EXP" --mode "$MODE" "${SET_ARGS[@]}")" || exit 2
LOG_DIR="$RUN_DIR/logs"
mkdir -p "$LOG_DIR"

echo "NEURONS: exp=$EXP subj=$SUBJ mode=$MODE profile=$PROFILE stages=$(IFS=; echo "${SELECTED[*]}") gpu=$GPU run=$RUN_DIR"
for k in "${SELECTED[@]}"; do
  script="$HERE/${STAGE_SCRIPT[$k]}"
  log="$LOG_DIR/stage${k}_$(date +%Y%m%d-%H%M%S).log"
  args=(--profile "$PROFILE" --subj "$SUBJ" --exp "$EXP" --mode "$MODE" "${SET_ARGS[@]}")
  if [[ $NUM_PROC -gt 1 && "$MULTI_DEVICE_STAGES" == *"$k"* ]]; then
    port="$(free_port)"
    cmd=("$PY" -m accelerate.commands.launch --num_processes "$NUM_PROC" --main_process_port "$port" "$script" "${args[@]}")
  else
    cmd=("$PY" -u "$script" "${args[@]}")
  fi
  echo "== stage $k (${STAGE_NAME[$k]}): log $log"
  set +e
  NEURONS_DRIVER_LOG="$log" "${cmd[@]}" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  if [[ $status -ne 0 ]]; then
    echo "error: stage $k (${STAGE_NAME[$k]}) failed with exit status $status; see $log" >&2
    exit "$status"
  fi
done
echo "NEURONS: done (stages $(IFS=; echo "${SELECTED[*]}")), run folder $RUN_DIR"
