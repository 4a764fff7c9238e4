#!/usr/bin/env bash
# Per-worker peak RSS and checkpoint bytes read under expert parallelism (issue 17):
# one MoE config (configs/ep-memory.yaml by default), started with --init from a
# checkpoint sharded as ep 4, trained a few steps on the CPU by 1 process, then by
# mpirun -np 2 --ep 2 and -np 4 --ep 4, all on the same global batch of GLOBAL_BATCH
# utterances (default 8: 8 per step for one process, 4 per worker at ep 2, 2 at ep 4, as
# data parallelism splits it; the config's static batch_size is replaced). Each rank runs
# under /usr/bin/time -v; the trainer logs "model: read N bytes of M in the checkpoint".
#
#   bench/ep_memory.sh DATA WORK [CONFIG] [STEPS]
#
# UPCYCLE names the binary (default target/release/upcycle). Prints one line per
# (ep, rank): peak RSS in MiB, bytes read, bytes in the checkpoint.
set -euo pipefail
data=$1 work=$2 config=${3:-configs/ep-memory.yaml} steps=${4:-3}
global=${GLOBAL_BATCH:-8}
upcycle=${UPCYCLE:-target/release/upcycle}
mkdir -p "$work"
if [ ! -d "$work/init4" ]; then
    "$upcycle" train --config "$config" --data "$data" --out "$work/seed" --max-steps 1 \
        --device cpu 2>"$work/seed.log"
    "$upcycle" convert reshard --from "$work/seed" --world 4 --ep 4 --out "$work/init4"
fi
init=$(ls -d "$work"/init4/step-*)
for ep in 1 2 4; do
    run="$work/run-ep$ep"
    rm -rf "$run"
    ((global % ep == 0)) || { echo "GLOBAL_BATCH $global is not a multiple of ep $ep" >&2; exit 2; }
    sed -E "s/batch_size: [0-9]+/batch_size: $((global / ep))/" "$config" >"$run.yaml"
    # One rank: $1 its rank; time -v's report and the log go to files named by rank.
    worker="r=\${OMPI_COMM_WORLD_RANK:-0}; exec /usr/bin/time -v -o $run.time-\$r \
        $upcycle train --config $run.yaml --data $data --out $run --max-steps $steps \
        --device cpu --init $init --ep $ep 2>$run.log-\$r"
    if [ "$ep" = 1 ]; then
        bash -c "$worker"
    else
        mpirun -np "$ep" --oversubscribe --allow-run-as-root bash -c "$worker"
    fi
    for ((r = 0; r < ep; r++)); do
        rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2 / 1024}' "$run.time-$r")
        bytes=$(grep -o 'model: read [0-9]* bytes of [0-9]*' "$run.log-$r" | awk '{print $3, $6}')
        echo "ep $ep batch $((global / ep)) rank $r peak_rss_mib $rss model_bytes_read_of $bytes"
    done
done
