#!/usr/bin/env bash
# Fast MRP against exact MRP (default schedule) at 60/70/80% Wanda, with uniform as the reference: one process
# per (model, sparsity) so the small models keep one GPU busy, every run of a process on the same calibration
# windows (8 x 512, as the CPU pairs); WikiText-2 test, 16 windows of 2048 tokens. Each process is cut at LIMIT
# seconds so partial JSON (written after every run) always comes back.
# Usage: bench/h200_fast_vs_exact.sh OUT_DIR DATA_DIR LIMIT NAME=MODEL_PATH [NAME=MODEL_PATH ...]
set -u
out=$1; data=$2; limit=$3; shift 3
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
for model in "$@"; do
    name=${model%%=*}
    for s in 0.6 0.7 0.8; do
        OMP_NUM_THREADS=1 timeout "$limit" python "$here/mrp_grid.py" --model "$model" --eval wikitext \
            --sparsities "$s" --nsamples 8 --seqlen 512 --max-windows 16 --device cuda --data "$data" \
            --keep-allocation --json "$out/pair-$name-$s.json" --run uniform --run mrp-fast \
            --run "mrp-fast pilot=dense" --run "mrp-fast pilot=start" --run mrp > "$out/pair-$name-$s.log" 2>&1 &
    done
done
wait
tail -n 7 "$out"/pair-*.log
