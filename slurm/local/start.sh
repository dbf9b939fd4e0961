#!/usr/bin/env bash
# Start a private single-node SLURM cluster (munged, slurmctld, slurmd) whose every file lives in STATE_DIR.
#   slurm/local/start.sh STATE_DIR        then: source STATE_DIR/env.sh; sbatch ...; slurm/local/stop.sh STATE_DIR
# Needs root and the Debian packages slurmctld slurmd slurm-client munge (not started by their install).
# Private means: its own munged socket and key copy, its own ports and slurm.conf (SLURM_CONF), so it neither
# uses nor disturbs another cluster or munged on the machine. Partitions: `debug` (default, preemptible by
# requeue) and `high` (preempts debug). If start fails half way, stop.sh STATE_DIR still cleans up.
set -euo pipefail

STATE_DIR=${1:?usage: start.sh STATE_DIR}
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
READY_TIMEOUT_S=${READY_TIMEOUT_S:-30}

INSTALL="apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
for tool in munged munge slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || { echo "start.sh: $tool not found: $INSTALL" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "start.sh: must run as root (uid $(id -u))" >&2; exit 1; }
[ -e "$STATE_DIR/slurm.conf" ] && { echo "start.sh: $STATE_DIR/slurm.conf exists: stop that cluster first" >&2; exit 1; }

# munged refuses a socket whose directory is not executable by all.
chmod 755 "$STATE_DIR"
mkdir -p "$STATE_DIR"/{munge,ctld,spool,log}
chmod 755 "$STATE_DIR/munge"

HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts

# Any Python will do (PYTHON, else python3 on PATH): ask the kernel for a free port.
free_port() { "${PYTHON:-python3}" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

start_munge() {
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile="$key"
    fi
    # munged running as root wants a root-owned key: use a private copy.
    install -m 600 -o root -g root "$key" "$STATE_DIR/munge/munge.key"
    munged --socket="$STATE_DIR/munge/munge.sock" --key-file="$STATE_DIR/munge/munge.key" \
        --pid-file="$STATE_DIR/munge/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed"
    munge -S "$STATE_DIR/munge/munge.sock" -n | unmunge -S "$STATE_DIR/munge/munge.sock" >/dev/null
}

write_conf() {
    local cpus mem_mb sockets cores threads
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS (often 1 in tests)
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    # The node's topology must match `slurmd -C`, else slurmd drains it ("reconfigured socket/core boundaries").
    read -r sockets cores threads < <(slurmd -C | head -n1 | tr ' ' '\n' |
        awk -F= '/^SocketsPerBoard=/ {s=$2} /^CoresPerSocket=/ {c=$2} /^ThreadsPerCore=/ {t=$2} END {print s, c, t}')
    cat > "$STATE_DIR/slurm.conf" <<EOF
ClusterName=longvl
SlurmctldHost=$HOST
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=socket=$STATE_DIR/munge/munge.sock,cred_expire=5
MpiDefault=none
MailProg=/bin/true
# No cgroups (containers, no systemd): track processes by parentage; linuxproc still signals the whole tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: no sacct; job state comes from `scontrol show job`.
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
# A job on 'high' preempts (requeues) a job on 'debug'; preempt_send_user_signal first sends the job's
# --signal (B:USR1 in pretrain.sbatch) so it can checkpoint during GraceTime.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
NodeName=$HOST CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=high Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    echo "export SLURM_CONF=$STATE_DIR/slurm.conf" > "$STATE_DIR/env.sh"
}

wait_idle() {
    local deadline=$((SECONDS + READY_TIMEOUT_S)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(sinfo -h -N -o %t 2>/dev/null | head -n1 || true)
        [ "$state" = idle ] && return 0
        sleep 0.3
    done
    echo "start.sh: node state '${state}' is not idle after ${READY_TIMEOUT_S}s; logs in $STATE_DIR/log" >&2
    return 1
}

start_munge
write_conf
export SLURM_CONF=$STATE_DIR/slurm.conf
# -c: a cold start, never recover jobs of an earlier cluster.
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
wait_idle
echo "cluster up: source $STATE_DIR/env.sh"
