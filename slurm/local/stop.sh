#!/usr/bin/env bash
# Tear down a cluster made by start.sh: cancel every job, wait for the queue to drain, stop slurmd,
# slurmctld and munged by the PIDs in their pid files, then delete STATE_DIR (conf, state, logs) so a
# later start never recovers old jobs. KEEP_STATE=1 keeps the directory (logs) for a post-mortem.
# Safe on a half-started cluster and when run twice.
set -uo pipefail

STATE_DIR=${1:?usage: stop.sh STATE_DIR}
[ -d "$STATE_DIR" ] || exit 0
DRAIN_TIMEOUT_S=${DRAIN_TIMEOUT_S:-20}
export SLURM_CONF=$STATE_DIR/slurm.conf

# SIGTERM all daemons at once (each takes ~2 s to exit), wait up to 5 s, then SIGKILL what is left.
stop_daemons() {
    local pids=() pid_file pid alive
    for pid_file in "$@"; do
        [ -s "$pid_file" ] || continue
        pid=$(cat "$pid_file")
        kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    for _ in $(seq 50); do
        alive=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || continue
        echo "stop.sh: pid $pid ignored SIGTERM for 5 s: SIGKILL" >&2
        kill -9 "$pid" 2>/dev/null
    done
}

CTLD_PID=$(cat "$STATE_DIR/slurmctld.pid" 2>/dev/null || true)
if [ -f "$SLURM_CONF" ] && [ -n "$CTLD_PID" ] && kill -0 "$CTLD_PID" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [ -n "${jobs// }" ] && scancel $jobs 2>/dev/null
    deadline=$((SECONDS + DRAIN_TIMEOUT_S))
    while [ $SECONDS -lt $deadline ] && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; do
        sleep 0.3
    done
fi

stop_daemons "$STATE_DIR/slurmd.pid" "$STATE_DIR/slurmctld.pid" "$STATE_DIR/munge/munged.pid"

if [ "${KEEP_STATE:-0}" != 1 ]; then
    rm -rf "$STATE_DIR"
fi
