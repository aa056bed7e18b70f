#!/usr/bin/env bash
# Allocation quality grid on one GPU, every (model, sparsity, group) its own process so small models keep the
# GPU busy. Tuning (M, start gap, granularity, schedule) on held-out C4 at 70%; final figures on WikiText-2.
# Usage: bench/h200_allocation.sh OUT_DIR SMOLLM2_PATH GEMMA_PATH DATA_DIR
set -u
out=$1; smol=$2; gemma=$3; data=$4
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
common=(--nsamples 64 --seqlen 512 --max-windows 16 --device cuda --data "$data")
exact_b="step=0.1 gamma=0.9 min_step=0.02"
grid() {  # NAME LOG ARGS...
    local log=$1; shift
    OMP_NUM_THREADS=1 python "$here/mrp_grid.py" "${common[@]}" "$@" > "$out/$log.log" 2>&1 &
}
for model in "smollm2=$smol" "gemma=$gemma"; do
    name=${model%%=*}
    grid "tune-$name" --model "$model" --eval heldout --work "/tmp/work-$name" --sparsities 0.7 \
        --json "$out/tune-$name.json" --run uniform --run owl --run alphapruning \
        --run "mrp-fast m=3" --run "mrp-fast m=5" --run "mrp-fast m=7" --run "mrp-fast m=10" \
        --run "mrp-fast m=15" --run "mrp-fast m=20" --run "mrp-fast m=10 s0_gap=0.05" \
        --run "mrp-fast m=10 s0_gap=0.2" --run "mrp-fast m=10 granularity=layer" \
        --run "mrp m=5 $exact_b" --run "mrp m=10 $exact_b"
    for s in 0.6 0.7 0.8; do
        grid "final-$name-$s-a" --model "$model" --eval wikitext --sparsities $s --dense \
            --json "$out/final-$name-$s-a.json" --run uniform --run owl --run alphapruning \
            --run "mrp-fast m=5" --run "mrp-fast m=10" --run "mrp m=5 $exact_b"
        grid "final-$name-$s-b" --model "$model" --eval wikitext --sparsities $s \
            --json "$out/final-$name-$s-b.json" --run "mrp m=10 $exact_b"
        grid "final-$name-$s-c" --model "$model" --eval wikitext --sparsities $s \
            --json "$out/final-$name-$s-c.json" --run "mrp m=10"
    done
done
wait
