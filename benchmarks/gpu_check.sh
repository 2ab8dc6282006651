#!/usr/bin/env bash
# The GPU check, in one script and one call, for a session that is lent a GPU (docs/benchmarks.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh                        # after the 4 carry calls; about 6 minutes
#   STEPS="model engine" bash benchmarks/gpu_check.sh   # only if the first call ran out of time: the rest
#
# Run from the repository root. The machine starts with Python 3.12, torch 2.11 cu130 and a
# scientific stack but no DALI: the missing wheels come in .whl/parts/pack.tar.NN, made here by
# `python -m stagewise.benchmarks.gpu_wheels` and carried one part per call. Steps run in order of
# importance, each with a time box, and write their result under $OUT as soon as they end, so a run
# cut short still returns what it finished; the whole run keeps to DEADLINE_S (default 360 s: with
# the machine's start and the carries, twice that fits a session's 15 minutes of device time). Steps
# already done on a warm machine (install, data) are skipped. $OUT/gpu-check.md sums it up in
# docs/benchmarks.md's table format.
#
# Dry run on a CPU machine (every step's command, tiny sizes, DALI's CPU mode):
#   DRY_RUN=1 OUT=/tmp/gpu-dry PY=.venv/bin/python bash benchmarks/gpu_check.sh
set -u
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu-check}
PY=${PY:-python3}
STEPS=${STEPS:-"install data test loader train model engine"}
DEADLINE_S=${DEADLINE_S:-360}
DRY_RUN=${DRY_RUN:-0}
WORK=${WORK:-/tmp/stagewise-gpu}  # installed packages, the stagewise import root, the benchmark data
START=$(date +%s)
mkdir -p "$OUT" "$WORK"

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/check.log"; }

# step NAME BOX CMD...: runs CMD with a time box of min(BOX, time left), output in $OUT/NAME.log.
step() {
  local name=$1 box=$2; shift 2
  local left=$(( DEADLINE_S - ($(date +%s) - START) - 5 ))
  if (( left < 20 )); then log "step $name: skipped, ${left}s left"; echo "$name skipped 0" >> "$OUT/steps.txt"; return 1; fi
  (( box > left )) && box=$left
  log "step $name (box ${box}s): $*"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$box" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  log "step $name: exit $rc after ${secs}s$( ((rc == 124)) && echo ' (time box reached)')"
  echo "$name $rc $secs" >> "$OUT/steps.txt"
  return $rc
}

# The packages go to $WORK/site with --target (no venv, nothing in the system's site-packages);
# `stagewise` is a namespace of links to the repository's folders (pyproject's package-dir).
setup_paths() {
  mkdir -p "$WORK/root/stagewise"
  for pkg in shards pipeline loaders model train benchmarks; do ln -sfn "$REPO/$pkg" "$WORK/root/stagewise/$pkg"; done
  if [[ "$DRY_RUN" == 1 ]]; then export PYTHONPATH="$REPO"; else export PYTHONPATH="$WORK/site:$WORK/root:$REPO"; fi
  export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
}

# The CUDA libraries the carried wheels bring (nvJPEG, nvImageCodec, nvCOMP) where a dlopen finds them.
lib_paths() {
  local dirs
  dirs=$(ls -d "$WORK"/site/nvidia/*/lib "$WORK"/site/nvidia/*/lib64 2>/dev/null | tr '\n' ':')
  export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:-}"
}

do_install() {
  if [[ -f "$WORK/site/.installed" ]]; then echo "already installed"; return 0; fi
  local parts="$REPO/.whl/parts"
  ls "$parts"/pack.tar.* > /dev/null || { echo "no wheel parts in $parts: carry them first (gpu_wheels)"; return 2; }
  (cd "$parts" && sha256sum -c --quiet SHA256SUMS) || { echo "a part is missing or damaged"; return 2; }
  rm -rf "$WORK/pack" && mkdir -p "$WORK/pack"
  cat "$parts"/pack.tar.* | tar -x -C "$WORK/pack" || return 2
  (cd "$WORK/pack" && sha256sum -c --quiet SHA256SUMS) || return 2
  if [[ "$DRY_RUN" == 1 ]]; then  # here: the wheels must all be CPython 3.12 manylinux x86_64 ones pip accepts
    "$PY" -m pip install --dry-run --quiet --no-index --no-deps --target "$WORK/site" --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      "$WORK"/pack/wheels/*.whl || return 2
    echo "dry run: $(ls "$WORK"/pack/wheels/*.whl | wc -l) wheels join, check and resolve for CPython 3.12"
    return 0
  elif "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --target "$WORK/site" "$WORK"/pack/wheels/*.whl || return 2
  else  # no pip: a wheel is a zip of the installed files (none of these needs its scripts)
    for w in "$WORK"/pack/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$WORK/site" || return 2; done
  fi
  touch "$WORK/site/.installed"
  "$PY" -c "import nvidia.dali, torch, torchvision, timm, webdataset, PIL, sklearn; print('dali', nvidia.dali.__version__, \
'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
}

do_data() {  # 2,560 crops of 500x375 (~55 KB) in 10 classes, 20 shards of 128
  local src="$WORK/src" ds="$WORK/ds" count=2560 workers=16 per=160
  if [[ "$DRY_RUN" == 1 ]]; then count=256 workers=2 per=128; fi
  if [[ -f "$ds/manifest.json" ]]; then echo "data already built: $ds"; return 0; fi
  rm -rf "$src" "$ds"
  local pids=() start
  for (( start = 0; start < count; start += per )); do
    "$PY" -m stagewise.benchmarks.datasets crops "$src" --count "$per" --start "$start" & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || return 2; done
  "$PY" -m stagewise.pipeline build-shards "$src" "$ds" --layout folder --split train --workers "$workers" \
    --samples-per-shard 128
}

env_report() {
  { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi";
    nproc; uptime; "$PY" -c "import sys; print('python', sys.version.split()[0])"; } > "$OUT/env.txt" 2>&1
}

export -f do_install do_data  # `timeout` runs them in a child bash
export REPO OUT PY DRY_RUN WORK
setup_paths
env_report
if [[ "$DRY_RUN" == 1 ]]; then
  DEVICE=cpu SIZES=64,96 BATCH=32 THREADS=2 ROUNDS=1 BATCHES=2 TRAIN_SIZES=32,48 TRAIN_BATCH=4 TRAIN_STEPS=1 \
    MODEL_SIZES=32 MODEL_BATCH=2 MODEL_STEPS=1 COMPILE_BOX=60 DTYPE=fp32  # a CPU compile outlasts its box: expected
else
  DEVICE=cuda SIZES=128,300 BATCH=256 THREADS=16 ROUNDS=3 BATCHES=8 TRAIN_SIZES=128,184,240,300 TRAIN_BATCH=128 \
    TRAIN_STEPS=12 MODEL_SIZES=300 MODEL_BATCH=128 MODEL_STEPS=10 COMPILE_BOX=120 DTYPE=bf16
fi
DS="$WORK/ds"
for s in $STEPS; do
  case $s in
    install) step install 90 bash -c do_install || { log "install failed: see install.log"; break; }
             lib_paths ;;
    data)    step data 60 bash -c do_data || break ;;
    test)    if [[ "$DRY_RUN" == 1 ]]; then
               step test 120 "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs
             else
               step test 120 "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider -rA --timeout 60 \
                 --junitxml "$OUT/test_gpu.xml"
             fi ;;
    loader)  step loader 120 "$PY" -m stagewise.pipeline bench-loader "$DS" --device "$DEVICE" --sizes "$SIZES" \
               --batch-size "$BATCH" --mixup-alpha 0.2 --threads "$THREADS" --rounds "$ROUNDS" --batches "$BATCHES" \
               --warmup 3 --json-out "$OUT/bench-loader.json" ;;
    engine)  # our side only, 128 px: DALI's executor options, the decoder's HW share, and the tree against branchless
             for variant in "default:" "concurrency-full:--concurrency full --stream-policy per_operator" \
                            "hw-load-0.9:--hw-decoder-load 0.9" "tree:--branchless off"; do
               name=${variant%%:*} flags=${variant#*:}
               # shellcheck disable=SC2086
               step "engine-$name" 45 "$PY" -m stagewise.pipeline bench-loader "$DS" --device "$DEVICE" \
                 --sizes "${SIZES%%,*}" --batch-size "$BATCH" --mixup-alpha 0.2 --threads "$THREADS" --rounds 2 \
                 --batches "$BATCHES" --warmup 3 --no-baseline $flags --json-out "$OUT/engine-$name.json"
             done ;;
    train)   step train 100 "$PY" -m stagewise.benchmarks.gpu_check train "$DS" --out "$OUT/train.json" \
               --device "$DEVICE" --sizes "$TRAIN_SIZES" --batch "$TRAIN_BATCH" --steps "$TRAIN_STEPS" \
               --warmup "$( [[ "$DRY_RUN" == 1 ]] && echo 1 || echo 5 )" --threads "$THREADS" ;;
    model)   step model-eager 60 "$PY" -m stagewise.pipeline bench-model --device "$DEVICE" --channels-last \
               --dtype "$DTYPE" --sizes "$MODEL_SIZES" --batch "$MODEL_BATCH" --steps "$MODEL_STEPS" --rounds 2 --json
             step model-compiled "$COMPILE_BOX" "$PY" -m stagewise.pipeline bench-model --device "$DEVICE" --channels-last \
               --dtype "$DTYPE" --compile --sizes "${MODEL_SIZES##*,}" --batch "$MODEL_BATCH" --steps "$MODEL_STEPS" --rounds 2 --json
             ;;
    *)       log "unknown step $s" ;;
  esac
done
"$PY" -m stagewise.benchmarks.gpu_check report "$OUT" > /dev/null 2>&1 || log "report failed"
log "done in $(( $(date +%s) - START ))s; summary: $OUT/gpu-check.md"
