#!/usr/bin/env bash
# The MoE-1B shape under expert parallelism on CPUs (issue 17, bench/ep_memory.md):
# configs/moe-1b.yaml built from the seed and trained one step by `mpirun -np 4 --ep 4`
# (each worker holds the dense part and 2 of every bank's 8 experts), its checkpoint
# resharded to ep 2, and one more step resumed from it by `mpirun -np 2 --ep 2`. Prints
# each stage's exit status, wall time and every rank's peak RSS (/usr/bin/time -v).
# Needs ~22 GiB of memory and ~25 GB of disk under WORK (deleted at the end).
#
#   bench/moe_1b.sh DATA WORK      (UPCYCLE names the binary; default target/release/upcycle)
set -euo pipefail
data=$1 work=$2
upcycle=${UPCYCLE:-target/release/upcycle}
rm -rf "$work" && mkdir -p "$work"
peaks() { # PREFIX: every rank's peak RSS in GiB
    awk -F': ' '/Maximum resident set size/ {printf "%.2f GiB ", $2 / 1048576}' "$1"*
    echo
}
stage() { # NAME COMMAND...: runs it, prints its status and wall time
    local name=$1 start=$SECONDS; shift
    if "$@"; then echo "$name: ok, $((SECONDS - start)) s"; else echo "$name: FAILED ($?)"; exit 1; fi
}
rank='r=${OMPI_COMM_WORLD_RANK:-0}'
stage "ep 4, 1 step from the seed" mpirun -np 4 --oversubscribe --allow-run-as-root bash -c \
    "$rank; exec /usr/bin/time -v -o $work/time4-\$r $upcycle train --config configs/moe-1b.yaml \
     --data $data --out $work/run --max-steps 1 --device cpu --ep 4 2>$work/log4-\$r"
echo "  peak RSS per rank: $(peaks "$work/time4-")"
sed 's/\x1b\[[0-9;]*m//g' "$work/log4-0" | grep -o 'model built params=[0-9]*' | sed 's/^/  per worker: /' || true
stage "reshard to ep 2" /usr/bin/time -v -o "$work/time-reshard" \
    "$upcycle" convert reshard --from "$work/run" --world 2 --ep 2 --out "$work/ep2"
echo "  peak RSS: $(peaks "$work/time-reshard")"
rm -rf "$work/run"
stage "ep 2, step 2 resumed" mpirun -np 2 --oversubscribe --allow-run-as-root bash -c \
    "$rank; exec /usr/bin/time -v -o $work/time2-\$r $upcycle train --config configs/moe-1b.yaml \
     --data $data --out $work/run2 --resume $work/ep2 --max-steps 2 --device cpu --ep 2 2>$work/log2-\$r"
echo "  peak RSS per rank: $(peaks "$work/time2-")"
tail -n 2 "$work/run2/metrics.jsonl" | cut -c1-160
rm -rf "$work/ep2" "$work/run2"
