#!/usr/bin/env bash
# Train the quality model and its Flux routers on one GPU, then pack the checkpoint for copying
# back. Everything lands in $OUT (or the first argument): at most 8 files, each <= 15 MiB.
#   model:   python -m training.train_model  (MODEL_MINUTES of training, default 5.25)
#   routers: python -m training.routers       (ROUTER_MINUTES, default 1.75, shortened so the
#            whole script ends within TOTAL_SECONDS, default 555)
#   tiny:    the CI model (preset tiny) and its routers, trained beside the router phase
#            (TINY_MINUTES, default 1.25; TINY=0 skips it), packed as one tar
# Reassemble here with `make quality-model` (training.pack unpack). See docs/quality.md.
set -uo pipefail
OUT=${1:-${OUT:?give the output folder as \$OUT or the first argument}}
PRESET=${PRESET:-gpu}
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${TOTAL_SECONDS:-555}))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ! $PY -c "import wonderwords" 2>/dev/null; then
  export PYTHONPATH="$PWD/training/vendor:$PYTHONPATH"  # the word lists the task generators use
fi
remaining() {  # seconds left before the deadline, minus $1 kept in reserve (at least 30)
  local r=$((DEADLINE - $(date +%s) - $1)); [ $r -lt 30 ] && r=30; echo $r
}
WORK=${WORK:-$(mktemp -d)}
CKPT="$WORK/fluxserve-quality-model"
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

# Every phase saves before its final evaluation; the `timeout`s only guard against a hang, so
# that the packing below always runs before TOTAL_SECONDS.
timeout "$(remaining 150)" \
  $PY -m training.train_model --preset "$PRESET" --out "$CKPT" --seed "${SEED:-1234}" \
    --max-minutes "${MODEL_MINUTES:-5.25}" --metrics "$WORK/model.log.jsonl"
model_rc=$?
router_rc=1
TINY_CKPT="$WORK/fluxserve-quality-tiny"
if [ "${TINY:-1}" = 1 ]; then
  # the CI model: small enough to share the GPU with the router phase
  ( timeout 270 $PY -m training.train_model --preset tiny --out "$TINY_CKPT" \
        --seed "${SEED:-1234}" --max-minutes "${TINY_MINUTES:-1.25}" --workers 3 \
        --metrics "$WORK/tiny.log.jsonl" \
    && timeout "$(remaining 20)" $PY -m training.routers --model "$TINY_CKPT" \
        --out "$TINY_CKPT/router" --recipe tiny --max-minutes 0.3 \
        --metrics "$WORK/tiny_router.log.jsonl" ) > "$WORK/tiny.out" 2>&1 &
  tiny_pid=$!
fi
if [ $model_rc -eq 0 ]; then
  left=$((DEADLINE - $(date +%s) - 80))  # router start-up, held-out evaluation and packing
  minutes=$($PY -c "print(round(max(0.2, min(${ROUTER_MINUTES:-1.75}, $left / 60)), 2))")
  echo "router training: $minutes minutes"
  timeout "$(remaining 15)" \
    $PY -m training.routers --model "$CKPT" --out "$CKPT/router" --max-minutes "$minutes" \
      --recipe "$PRESET" --metrics "$WORK/router.log.jsonl"
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
  $PY -m training.report "$CKPT" > "$OUT/summary.txt"
  [ -d "$TINY_CKPT" ] && { echo "--- tiny (CI) model"; $PY -m training.report "$TINY_CKPT"; } \
      >> "$OUT/summary.txt"
  echo "model rc=$model_rc router rc=$router_rc tiny rc=$tiny_rc," \
       "$(( $(date +%s) - START )) s in all" >> "$OUT/summary.txt"
  ls -la "$OUT"
  cat "$OUT/summary.txt"
fi
[ $model_rc -eq 0 ] && [ $router_rc -eq 0 ]
