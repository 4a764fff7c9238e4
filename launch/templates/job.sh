#!/bin/bash
# Written by `upcycle launch --emit {{KIND}}`; edit freely. Each stage below runs as one
# group of workers ({{LAUNCHER}}); a failed group is started again up to MAX_RESTARTS
# times (a train stage resumes from its own --out's latest checkpoint), and a finished
# stage leaves a marker in STATE_DIR so that a resubmitted job skips it.
{{HEADER}}
set -uo pipefail

UPCYCLE=${UPCYCLE:-{{UPCYCLE}}}
STATE_DIR=${STATE_DIR:-{{STATE_DIR}}}
MAX_RESTARTS=${MAX_RESTARTS:-{{MAX_RESTARTS}}}
{{SETUP}}
export MASTER_PORT=${MASTER_PORT:-{{MASTER_PORT}}}
export TORCHELASTIC_MAX_RESTARTS=$MAX_RESTARTS

# run_stage NAME NPROC ARGS...: `upcycle ARGS...` on NPROC workers, restarted on failure.
run_stage() {
    local name=$1 nproc=$2
    shift 2
    if [ -e "$STATE_DIR/$name.done" ]; then
        echo "stage $name: finished earlier, skipped"
        return 0
    fi
    local attempt=0 status=0
    while :; do
        export UPCYCLE_RESTART_COUNT=$attempt TORCHELASTIC_RESTART_COUNT=$attempt
        echo "stage $name: $nproc worker(s), attempt $attempt: upcycle $*"
        {{RUN_WORKERS}} "$UPCYCLE" "$@"
        status=$?
        if [ "$status" -eq 0 ]; then
            break
        fi
        if [ "$attempt" -ge "$MAX_RESTARTS" ]; then
            echo "stage $name failed with status $status after $attempt restart(s)" >&2
            exit "$status"
        fi
        attempt=$((attempt + 1))
    done
    mkdir -p "$STATE_DIR" && touch "$STATE_DIR/$name.done"
}

{{STAGES}}
