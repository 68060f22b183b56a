#!/usr/bin/env bash
# Runs groups of convergence-benchmark variants as parallel processes (one GPU, or many cores),
# each into its own JSON, then merges them into one results file.
#
#   benchmarks/convergence_parallel.sh OUT.json SECONDS "variant,variant[:ablation]" ...
#
# Each group is `python -m benchmarks.convergence --setting $SETTING --phase all --seeds $SEEDS`
# over its variants, then the ablation after the colon (values $VALUES) at the chosen lrs. Every
# process is stopped SECONDS after the start; finished runs are kept (each is written when it ends). $EXTRA
# is passed to every process (e.g. "--steps 100").
set -u
out=$1; seconds=$2; shift 2
setting=${SETTING:-d256}; seeds=${SEEDS:-3}; values=${VALUES:-rotate}
work=$(mktemp -d)
deadline=$((SECONDS + seconds))
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
i=0
for group in "$@"; do
  i=$((i + 1))
  variants=${group%%:*}; ablation=""
  [[ $group == *:* ]] && ablation=${group#*:}
  (
    timeout "$seconds" python3 -m benchmarks.convergence --setting "$setting" --phase all \
      --seeds "$seeds" --optimizers "$variants" --out "$work/part$i.json" --no-plot ${EXTRA:-}
    if [[ -n $ablation ]] && ((deadline > SECONDS)); then
      timeout "$((deadline - SECONDS))" python3 -m benchmarks.convergence --setting "$setting" \
        --ablation "$ablation" --values "$values" --seeds "$seeds" --optimizers "$variants" \
        --out "$work/part$i.json" --no-plot ${EXTRA:-}
    fi
  ) > "$work/log$i.txt" 2>&1 &
done
wait
for log in "$work"/log*.txt; do echo "=== $log"; grep -v " step [0-9]*: held-out" "$log"; done
python3 - "$out" "$work"/part*.json <<'PY'
import json, sys
merged = {}
for path in sys.argv[2:]:
  data = json.load(open(path))
  runs = data.pop("runs", {})
  for key, value in data.items():
    if merged.setdefault(key, value) != value:
      raise SystemExit(f"{path}: {key} differs from the other parts")
  merged.setdefault("runs", {}).update(runs)
json.dump(merged, open(sys.argv[1], "w"), indent=1)
print(f"{len(merged.get('runs', {}))} runs -> {sys.argv[1]}")
PY
