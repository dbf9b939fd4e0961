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

stop_pid_file() {
    local pid_file=$1 pid
    [ -s "$pid_file" ] || return 0
    pid=$(cat "$pid_file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "stop.sh: pid $pid from $pid_file ignored SIGTERM for 5 s: SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
}

if [ -f "$SLURM_CONF" ] && [ -s "$STATE_DIR/slurmctld.pid" ] && kill -0 "$(cat "$STATE_DIR/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [ -n "${jobs// }" ] && scancel $jobs 2>/dev/null
    deadline=$((SECONDS + DRAIN_TIMEOUT_S))
    while [ $SECONDS -lt $deadline ] && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; do
        sleep 0.3
    done
fi

stop_pid_file "$STATE_DIR/slurmd.pid"
stop_pid_file "$STATE_DIR/slurmctld.pid"
stop_pid_file "$STATE_DIR/munge/munged.pid"

if [ "${KEEP_STATE:-0}" != 1 ]; then
    rm -rf "$STATE_DIR"
fi
