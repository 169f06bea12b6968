#!/usr/bin/env bash
# Soak run: the demo's services (a verifier, a learner, two actors on loopback, as `prime train`
# starts them) while actor-0 is killed (SIGKILL) and started again every RESTART_SECS seconds.
# `prime train` itself stops when an actor dies, so this script launches the roles one by one.
#
#   tests/soak.sh [STEPS] [RESTART_SECS]        (defaults: 10 steps, 60 s)
#
# Environment: PRIME (default target/release/prime), CONFIG (default configs/demo.toml),
# RUN_DIR (default runs/soak), SFT_FROM (a run dir whose sft/ and world/ are reused, default
# runs/demo; without one the supervised warm-up runs first). Checks at the end: the learner
# exited cleanly, every step 1..STEPS is recorded exactly once with B whole groups, and it
# prints the learner's counters as last scraped (reissued work = the killed actor's leases).
set -euo pipefail

STEPS=${1:-10}
RESTART_SECS=${2:-60}
PRIME=${PRIME:-target/release/prime}
CONFIG=${CONFIG:-configs/demo.toml}
RUN_DIR=${RUN_DIR:-runs/soak}
SFT_FROM=${SFT_FROM:-runs/demo}
export PRIME_THREADS=${PRIME_THREADS:-1} OMP_NUM_THREADS=${PRIME_THREADS:-1} OMP_WAIT_POLICY=PASSIVE

rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR/logs"
if [ -f "$SFT_FROM/sft/checkpoint/config.json" ]; then
  cp -r "$SFT_FROM/sft" "$RUN_DIR/sft"
  [ -d "$SFT_FROM/world" ] && cp -r "$SFT_FROM/world" "$RUN_DIR/world"
else
  "$PRIME" sft --config "$CONFIG" --run-dir "$RUN_DIR"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
VERIFIER=127.0.0.1:$(free_port)
LEARNER=127.0.0.1:$(free_port)
METRICS=127.0.0.1:$(free_port)

pids=()
actor0=
cleanup() { for pid in "${pids[@]}" $actor0; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

"$PRIME" verifier serve --listen "$VERIFIER" >"$RUN_DIR/logs/verifier.log" 2>&1 &
pids+=($!)
"$PRIME" learner serve --config "$CONFIG" --set "learner.steps=$STEPS" --run-dir "$RUN_DIR" \
  --listen "$LEARNER" --metrics-listen "$METRICS" >"$RUN_DIR/logs/learner.log" 2>&1 &
learner=$!
pids+=("$learner")

start_actor() { # name, log suffix
  "$PRIME" actor run --learner "http://$LEARNER" --verifier "http://$VERIFIER" \
    --tokenizer "$RUN_DIR/sft/checkpoint" --name "$1" >>"$RUN_DIR/logs/$1.log" 2>&1 &
  echo $!
}
actor1=$(start_actor actor-1)
pids+=("$actor1")
actor0=$(start_actor actor-0)
restarts=0
started=$(date +%s)
last_restart=$started
while kill -0 "$learner" 2>/dev/null; do
  sleep 2
  curl -sf "http://$METRICS/metrics" >"$RUN_DIR/logs/last-metrics.txt.new" 2>/dev/null &&
    mv "$RUN_DIR/logs/last-metrics.txt.new" "$RUN_DIR/logs/last-metrics.txt" || true
  now=$(date +%s)
  if [ $((now - last_restart)) -ge "$RESTART_SECS" ]; then
    kill -KILL "$actor0" 2>/dev/null || true
    wait "$actor0" 2>/dev/null || true
    actor0=$(start_actor actor-0)
    restarts=$((restarts + 1))
    last_restart=$now
    echo "$(date +%T) restarted actor-0 ($restarts)"
  fi
done
status=0
wait "$learner" || status=$?
elapsed=$(($(date +%s) - started))
echo "learner exited with $status after ${elapsed} s and $restarts actor restarts"
[ "$status" -eq 0 ] || { tail -20 "$RUN_DIR/logs/learner.log"; exit 1; }

python3 - "$RUN_DIR" "$STEPS" <<'EOF'
import json, sys
run_dir, steps = sys.argv[1], int(sys.argv[2])
records = [json.loads(l) for l in open(f"{run_dir}/metrics.jsonl") if l.strip()]
step_records = [r for r in records if r.get("kind") == "step"]
numbers = [r["step"] for r in step_records]
assert numbers == list(range(1, steps + 1)), f"steps recorded: {numbers}"
groups = {r["batch/groups"] for r in step_records}
assert len(groups) == 1, f"batch sizes differ: {groups}"
print(f"ok: steps 1..{steps} once each, {groups.pop()} groups per batch")
EOF
grep -E '^prime_learner_(groups_|work_|errors)' "$RUN_DIR/logs/last-metrics.txt" || true
