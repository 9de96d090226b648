#!/usr/bin/env bash
# Serve a trained quality model with `fluxserve serve` on 127.0.0.1 and measure every policy on
# it with `fluxserve eval` through the server; one bounded run (TOTAL_SECONDS, default 420), the
# server stopped on every exit path. See docs/quality.md ("Measuring a trained model").
#   usage: bash scripts/gpu_quality_eval.sh MODEL_DIR OUT_DIR
# Environment (defaults in brackets):
#   LENGTHS   eval lengths, shortest first, one `fluxserve eval` each   ["4K 8K 16K"]
#   SAMPLES   samples per task and length                              [16]
#   TASKS     eval tasks or groups          [niah_single_1 niah_single_2 niah_multikey_1 local_copy]
#   POLICIES  policy specs as `fluxserve eval --policies` takes them   [full, auto when the model
#             has a router, sparse, streaming/snapkv/calidrop:256,512,1024,2048]
#   TOTAL_SECONDS  the whole run, server stop included                 [420]
#   PORT      server port on 127.0.0.1                                 [18123]
#   SERVE_ARGS     extra `fluxserve serve` arguments, last (so they override the derived ones)
#   CONCURRENCY    eval requests in flight                             [16]
#   WORK      eval working folder (reuse it to resume)                 [a new temporary folder]
#   PYTHON    interpreter                                              [python3]
# OUT_DIR gets at most 8 files, no sub-folder: summary.csv, summary.json, results.jsonl, the
# accuracy plots (up to 3 PNGs), serve.log (its last 4 MiB) and summary.txt (printed last).
set -uo pipefail
MODEL_DIR=${1:?usage: gpu_quality_eval.sh MODEL_DIR OUT_DIR}
OUT=${2:?usage: gpu_quality_eval.sh MODEL_DIR OUT_DIR}
PY=${PYTHON:-python3}
START=$(date +%s)
TOTAL_SECONDS=${TOTAL_SECONDS:-420}
DEADLINE=$((START + TOTAL_SECONDS))
STOP_RESERVE=30  # seconds kept for stopping the server and writing the outputs
LENGTHS=${LENGTHS:-4K 8K 16K}
SAMPLES=${SAMPLES:-16}
TASKS=${TASKS:-niah_single_1 niah_single_2 niah_multikey_1 local_copy}
PORT=${PORT:-18123}
CONCURRENCY=${CONCURRENCY:-16}
URL="http://127.0.0.1:$PORT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ! $PY -c "import wonderwords" 2>/dev/null; then
  export PYTHONPATH="$PWD/training/vendor:$PYTHONPATH"  # the word lists the task generators use
fi
[ -f "$MODEL_DIR/config.json" ] || { echo "no config.json in $MODEL_DIR" >&2; exit 2; }
mkdir -p "$OUT"
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
SERVE_LOG="$WORK/serve.log"
EVAL_LOG="$WORK/eval.log"
NOTES_FILE="$WORK/notes.txt"  # each finished eval's notes (skipped policies, ...), one a line
: > "$EVAL_LOG"
: > "$NOTES_FILE"
left() { echo $((DEADLINE - $(date +%s))); }

# -- what to serve and measure
ROUTER_ARGS=()
if [ -f "$MODEL_DIR/router/router.safetensors" ]; then
  ROUTER_ARGS=(--flux-router "$MODEL_DIR/router")
fi
# `auto` only where the server will have a router (its own rule: a Flux checkpoint or a file)
HAS_ROUTER=$($PY -c "
import sys
from attention_backends.flux.router import router_available
print(int(router_available(sys.argv[1], sys.argv[2] or None)))" \
  "$MODEL_DIR" "${ROUTER_ARGS[1]:-}") || exit 2
if [ -n "${POLICIES:-}" ]; then
  read -r -a POLICY_SPECS <<< "$POLICIES"
else
  mapfile -t POLICY_SPECS < <($PY -m evaluation.quality_run policies \
                                 $([ "$HAS_ROUTER" = 1 ] && echo --auto))
fi
read -r -a LENGTH_LIST <<< "$LENGTHS"
read -r -a TASK_LIST <<< "$TASKS"
MAX_MODEL_LEN=$($PY -m evaluation.quality_run max-model-len "$MODEL_DIR" "${LENGTH_LIST[@]}") \
  || exit 2
read -r -a EXTRA_SERVE <<< "${SERVE_ARGS:-}"
echo "model $MODEL_DIR (router: $([ "$HAS_ROUTER" = 1 ] && echo yes || echo no))," \
     "max-model-len $MAX_MODEL_LEN, lengths ${LENGTH_LIST[*]}, $SAMPLES samples," \
     "tasks ${TASK_LIST[*]}, budget ${TOTAL_SECONDS}s, work $WORK"
echo "policies: ${POLICY_SPECS[*]}"

# -- the server, stopped on every exit path
SERVER_PID=
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 1 40); do  # up to 20 s for the drain and the engine's shutdown
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "server $SERVER_PID still up after 20 s: SIGKILL" >&2
      kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null
    fi
  fi
  wait "$SERVER_PID" 2>/dev/null
  # the engine core and workers run in the server's process group: none may outlive it
  kill -KILL -- "-$SERVER_PID" 2>/dev/null
  SERVER_PID=
}
trap 'stop_server' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# setsid: the server leads its own process group, so its engine processes can be ended with it
setsid $PY -m server.cli serve "$MODEL_DIR" "${ROUTER_ARGS[@]}" --host 127.0.0.1 --port "$PORT" \
  --max-model-len "$MAX_MODEL_LEN" --max-num-batched-tokens "$MAX_MODEL_LEN" \
  "${EXTRA_SERVE[@]}" > "$SERVE_LOG" 2>&1 &
SERVER_PID=$!
echo "server pid $SERVER_PID, log $SERVE_LOG; waiting for $URL/ready"
ready=0
while [ "$(left)" -gt $((STOP_RESERVE + 10)) ]; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "the server exited during start-up" >&2
    break
  fi
  if $PY -c "import sys, httpx; sys.exit(httpx.get(sys.argv[1], timeout=2).status_code != 200)" \
      "$URL/ready" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 2
done
STATUS=()
if [ $ready = 1 ]; then
  echo "server ready after $(( $(date +%s) - START )) s"
  # -- one eval per length, shortest first, so a run that runs out of time still has whole
  # lengths; each is bounded by what is left minus the reserve; SIGINT lets it keep its items
  for length in "${LENGTH_LIST[@]}"; do
    budget=$(( $(left) - STOP_RESERVE ))
    if [ $budget -lt 5 ]; then
      STATUS+=("length $length: not run (out of time)")
      continue
    fi
    echo "--- length $length: eval, at most $budget s" | tee -a "$EVAL_LOG"
    rm -f "$WORK/summary.json"  # so that only this eval's notes are read below
    timeout -s INT -k 5 "$budget" \
      $PY -m server.cli eval --url "$URL" --tasks "${TASK_LIST[@]}" --lengths "$length" \
        --samples "$SAMPLES" --policies "${POLICY_SPECS[@]}" --concurrency "$CONCURRENCY" \
        --out "$WORK" --no-progress >> "$EVAL_LOG" 2>&1
    rc=$?
    case $rc in
      0) STATUS+=("length $length: done")
         $PY -c "
import json, sys
for note in json.load(open(sys.argv[1]))['notes']:
    print(' '.join(note.split()))" "$WORK/summary.json" >> "$NOTES_FILE" ;;
      124|130|137) STATUS+=("length $length: stopped at the time limit (rc $rc), partial") ;;
      *) STATUS+=("length $length: eval failed (rc $rc), see eval.log lines in summary.txt") ;;
    esac
    echo "${STATUS[-1]}"
  done
else
  STATUS+=("server not ready: no eval run")
fi
stop_server
trap - EXIT

# -- outputs: at most 8 files in OUT
NOTES=()
mapfile -t NOTES < <(sort -u "$NOTES_FILE")
NOTE_ARGS=()
for n in "${STATUS[@]}" "${NOTES[@]}"; do NOTE_ARGS+=(--note "$n"); done
TABLE=$($PY -m evaluation.quality_run summarize --work "$WORK" --out "$OUT" \
          --tasks "${TASK_LIST[@]}" --lengths "${LENGTH_LIST[@]}" --samples "$SAMPLES" \
          --policies "${POLICY_SPECS[@]}" "${NOTE_ARGS[@]}" 2>&1)
summary_rc=$?
tail -c 4194304 "$SERVE_LOG" > "$OUT/serve.log"
{
  echo "fluxserve eval of $MODEL_DIR through fluxserve serve (max-model-len $MAX_MODEL_LEN)"
  echo "accuracy (%), $SAMPLES samples per cell; rows: task x length, columns: policies"
  echo "$TABLE"
  printf '%s\n' "${STATUS[@]}"
  for n in "${NOTES[@]}"; do echo "note: $n"; done
  if [ $ready != 1 ] || [ $summary_rc != 0 ]; then
    echo "--- serve.log (last 30 lines)"; tail -n 30 "$SERVE_LOG"
    echo "--- eval.log (last 30 lines)"; tail -n 30 "$EVAL_LOG"
  elif grep -q -E '^(fluxserve eval: error|Traceback)' "$EVAL_LOG"; then
    echo "--- eval errors"; grep -E -A3 '^(fluxserve eval: error|Traceback)' "$EVAL_LOG" | tail -n 30
  fi
  echo "$(( $(date +%s) - START )) s in all"
} > "$OUT/summary.txt"
ls -la "$OUT"
cat "$OUT/summary.txt"
[ $ready = 1 ] && [ $summary_rc = 0 ] && ! grep -q 'eval failed' "$OUT/summary.txt"
