#!/usr/bin/env bash
# The compression table of docs/results.md: methods x budgets x seeds, one run at a time
# (2 cores). Each run writes results/compress/<method>_<budget>_s<seed>[_<text>].json;
# existing results are kept, so the script resumes. Then: python experiments/compress_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
run() {  # method budget seed [text]
  local text=${4:-sst2cola}
  local out="results/compress/$1_$2_s$3$([ "$text" = sst2cola ] || echo "_$text").json"
  [ -f "$out" ] && return 0
  python experiments/compress_minilm.py --method "$1" --budget "$2" --seed "$3" --text "$text" \
    --heal-steps "$STEPS" --out "$out" --no-progress --threads "${THREADS:-1}"
}
for b in 0.5 0.25; do run data_aware $b 0; done
run lowrank 0.5 0; run mpo_plain 0.5 0
for s in 1 2; do run data_aware 0.5 $s; done
run lowrank 0.25 0; run mpo_plain 0.25 0
for s in 1 2; do run data_aware 0.25 $s; done
run greedy 0.5 0
run data_aware 0.5 0 docstrings
