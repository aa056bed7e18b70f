#!/usr/bin/env bash
# Fast MRP against exact MRP (default schedule) at 60/70/80% Wanda on SmolLM2-135M and Gemma-3-270M, with
# uniform as the reference: one process per (model, sparsity) so the small models keep one GPU busy, every run
# of a process on the same calibration windows; WikiText-2 test, 16 windows of 2048 tokens. Each process is
# cut at LIMIT seconds so partial JSON (written after every run) always comes back.
# Usage: bench/h200_fast_vs_exact.sh OUT_DIR SMOLLM2_PATH GEMMA_PATH DATA_DIR [LIMIT]
set -u
out=$1; smol=$2; gemma=$3; data=$4; limit=${5:-560}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
for model in "smollm2=$smol" "gemma=$gemma"; do
    name=${model%%=*}
    for s in 0.6 0.7 0.8; do
        dense=(); [ "$s" = 0.7 ] && dense=(--dense)
        OMP_NUM_THREADS=1 timeout "$limit" python "$here/mrp_grid.py" --model "$model" --eval wikitext \
            --sparsities "$s" --nsamples 64 --seqlen 512 --max-windows 16 --device cuda --data "$data" \
            "${dense[@]}" --json "$out/pair-$name-$s.json" --run uniform --run mrp-fast --run mrp \
            > "/tmp/pair-$name-$s.log" 2>&1 &
    done
done
wait
tail -n 5 /tmp/pair-*.log
