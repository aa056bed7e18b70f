#!/usr/bin/env bash
# Fast MRP against exact MRP over several calibration seeds, and the exact loop's own allocation pruned in one
# shot ('file from=mrp'): does the allocation decide the exact loop's perplexity, or the path of its nested
# masks? One process per (model, sparsity, seed), every run of a process on the same calibration windows
# (8 x 512); WikiText-2 test, 16 windows of 2048 tokens. Each process is cut at LIMIT seconds; its JSON is
# written after every run, so partial rows come back.
# Usage: bench/h200_fast_vs_exact_seeds.sh OUT_DIR DATA_DIR LIMIT "SPARSITIES" "SEEDS" NAME=MODEL_PATH [...]
set -u
out=$1; data=$2; limit=$3; sparsities=$4; seeds=$5; shift 5
logs=${TMPDIR:-/tmp}/fast_vs_exact_seeds  # beside OUT, not in it: a device call returns at most 8 files
mkdir -p "$out" "$logs"
here=$(cd "$(dirname "$0")" && pwd)
for model in "$@"; do
    name=${model%%=*}
    for s in $sparsities; do
        for seed in $seeds; do
            tag="$name-$s-seed$seed"
            OMP_NUM_THREADS=1 timeout "$limit" python "$here/mrp_grid.py" --model "$model" --eval wikitext \
                --sparsities "$s" --seed "$seed" --nsamples 8 --seqlen 512 --max-windows 16 --device cuda \
                --data "$data" --work "/tmp/grid-$tag" --json "$out/$tag.json" \
                --run uniform --run mrp-fast --run mrp --run "file from=mrp" > "$logs/$tag.log" 2>&1 &
        done
    done
done
wait
for log in "$logs"/*.log; do tail -n 4 "$log"; done
