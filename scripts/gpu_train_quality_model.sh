#!/usr/bin/env bash
# Train the quality model and its Flux routers on one GPU, then pack the checkpoint for copying
# back. Everything lands in $OUT (or the first argument): at most 8 files, each <= 15 MiB.
#   model:   python -m training.train_model  (MODEL_MINUTES of training, default 3.75)
#   routers: python -m training.routers       (ROUTER_MINUTES, default 1.0, shortened so the
#            whole script ends within TOTAL_SECONDS, default 420)
#   tiny:    the CI model (preset tiny) and its routers, trained beside the router phase
#            (TINY_MINUTES, default 1.0; TINY=0 skips it), packed as one tar
# It uses the first GPU it is shown (DEVICE, default cuda:0): on a machine shared with another
# job, choose the GPU with CUDA_VISIBLE_DEVICES. DataLoader workers default to about half the
# CPUs it may use (WORKERS, at most 12), so a job on the other GPU keeps the rest.
# The last thing printed is a short table (training.report --brief).
# Reassemble here with `make quality-model` (training.pack unpack). See docs/quality.md.
set -uo pipefail
OUT=${1:-${OUT:?give the output folder as \$OUT or the first argument}}
PRESET=${PRESET:-gpu}
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${TOTAL_SECONDS:-420}))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# the main processes feed a GPU; their CPU threads only add contention with the data workers
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if ! $PY -c "import wonderwords" 2>/dev/null; then
  export PYTHONPATH="$PWD/training/vendor:$PYTHONPATH"  # the word lists the task generators use
fi
remaining() {  # seconds left before the deadline, minus $1 kept in reserve (at least 30)
  local r=$((DEADLINE - $(date +%s) - $1)); [ $r -lt 30 ] && r=30; echo $r
}
NCPU=$(nproc)
WORKERS=${WORKERS:-$(( NCPU / 2 - 3 > 12 ? 12 : (NCPU / 2 - 3 < 2 ? 2 : NCPU / 2 - 3) ))}
ROUTER_WORKERS=$(( WORKERS > 8 ? 8 : WORKERS ))
DEVICE=${DEVICE:-cuda:0}  # cpu: a smoke run of the script's flow without a GPU
WORK=${WORK:-$(mktemp -d)}
CKPT="$WORK/fluxserve-quality-model"
mkdir -p "$OUT"
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>} cpus=$NCPU workers=$WORKERS" \
     "budget=${TOTAL_SECONDS:-420}s"
NGPU=$($PY -c "
import sys, torch
n = torch.cuda.device_count()
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if n else '', 'visible GPUs', n, file=sys.stderr)
print(n)") || exit 1
if [ -z "${CUDA_VISIBLE_DEVICES+x}" ] && [ "$NGPU" -gt 1 ]; then
  echo "note: CUDA_VISIBLE_DEVICES is unset and several GPUs are visible; using GPU 0"
fi

# Every phase saves before its final evaluation; the `timeout`s only guard against a hang, so
# that the packing below always runs before TOTAL_SECONDS.
timeout "$(remaining 95)" \
  $PY -m training.train_model --preset "$PRESET" --out "$CKPT" --seed "${SEED:-1234}" \
    --device "$DEVICE" --workers "$WORKERS" --max-minutes "${MODEL_MINUTES:-3.75}" \
    --metrics "$WORK/model.log.jsonl"
model_rc=$?
router_rc=1
TINY_CKPT="$WORK/fluxserve-quality-tiny"
if [ "${TINY:-1}" = 1 ]; then
  # the CI model: small enough to share the GPU with the router phase
  ( timeout "$(remaining 60)" $PY -m training.train_model --preset tiny --out "$TINY_CKPT" \
        --seed "${SEED:-1234}" --device "$DEVICE" --max-minutes "${TINY_MINUTES:-1.0}" \
        --workers 3 --metrics "$WORK/tiny.log.jsonl" \
    && timeout "$(remaining 25)" $PY -m training.routers --model "$TINY_CKPT" \
        --out "$TINY_CKPT/router" --recipe tiny --max-minutes 0.3 --device "$DEVICE" \
        --metrics "$WORK/tiny_router.log.jsonl" ) > "$WORK/tiny.out" 2>&1 &
  tiny_pid=$!
fi
if [ $model_rc -eq 0 ]; then
  left=$((DEADLINE - $(date +%s) - 75))  # router start-up, held-out evaluation and packing
  minutes=$($PY -c "print(round(max(0.2, min(${ROUTER_MINUTES:-1.0}, $left / 60)), 2))")
  echo "router training: $minutes minutes"
  timeout "$(remaining 20)" \
    $PY -m training.routers --model "$CKPT" --out "$CKPT/router" --max-minutes "$minutes" \
      --recipe "$PRESET" --device "$DEVICE" --workers "$ROUTER_WORKERS" \
      --metrics "$WORK/router.log.jsonl"
  router_rc=$?
fi
tiny_rc=skipped
if [ -n "${tiny_pid:-}" ]; then
  wait "$tiny_pid"; tiny_rc=$?
  tail -n 12 "$WORK/tiny.out"
  [ -d "$TINY_CKPT" ] && tar -C "$WORK" -cf "$OUT/fluxserve-quality-tiny.tar" fluxserve-quality-tiny
fi
cat "$WORK"/model.log.jsonl "$WORK"/router.log.jsonl "$WORK"/tiny.log.jsonl \
    "$WORK"/tiny_router.log.jsonl > "$OUT/curves.jsonl" 2>/dev/null
if [ -d "$CKPT" ]; then
  $PY -m training.pack pack "$CKPT" "$OUT/fluxserve-quality-model" --piece-mib 15
  models=("$CKPT"); [ -f "$TINY_CKPT/training_info.json" ] && models+=("$TINY_CKPT")
  { $PY -m training.report "$CKPT"
    [ -f "$TINY_CKPT/training_info.json" ] && { echo "--- tiny (CI) model"
                                                 $PY -m training.report "$TINY_CKPT"; }
    echo "--- short table"
    $PY -m training.report --brief "${models[@]}"
    echo "model rc=$model_rc router rc=$router_rc tiny rc=$tiny_rc," \
         "$(( $(date +%s) - START )) s in all"
  } > "$OUT/summary.txt"
  ls -la "$OUT"
  cat "$OUT/summary.txt"
else
  echo "no checkpoint: model rc=$model_rc, $(( $(date +%s) - START )) s in all" \
    | tee "$OUT/summary.txt"
  tail -n 20 "$WORK/model.log.jsonl" 2>/dev/null
fi
[ $model_rc -eq 0 ] && [ $router_rc -eq 0 ]
