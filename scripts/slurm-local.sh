#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the Slurm tests and for trying `vlp slurm` by hand.
#
#   scripts/slurm-local.sh start    install (apt) if needed, start munged, slurmctld, slurmd; wait for idle
#   scripts/slurm-local.sh status   the recorded daemons and what sinfo says
#   scripts/slurm-local.sh stop     stop exactly the daemons this script started (by recorded PID)
#
# Needs root (the daemons run as root) and apt-get (Debian/Ubuntu). Everything lives in one private
# folder, $SLURM_LOCAL_DIR (default /tmp/vlp-slurm): slurm.conf, munge key and socket, state, logs, PIDs.
# Clients need `export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf` (printed by start).
# Exit codes: 0 ok, 1 failure, 2 cannot run here (not root, no apt-get, the install failed).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/vlp-slurm}
CONF=$DIR/slurm.conf
DAEMONS=(munged slurmctld slurmd)

die() { echo "slurm-local: $*" >&2; exit 1; }
cannot() { echo "slurm-local: cannot run here: $*" >&2; exit 2; }

pid_of() { # the recorded PID of daemon $1 if that process still runs, else nothing
    local file=$DIR/$1.pid
    [[ -f $file ]] || return 0
    local pid
    pid=$(<"$file")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || cannot "Slurm is not installed and there is no apt-get"
    local packages=(slurmctld slurmd slurm-client munge)
    echo "slurm-local: apt-get install ${packages[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >"$DIR/apt.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >>"$DIR/apt.log" 2>&1 \
            || cannot "apt-get install ${packages[*]} failed, see $DIR/apt.log"
    fi
}

write_config() {
    local host node cpus memory
    host=$(hostname -s)
    node=$(slurmd -C | head -n 1)
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    (( memory > 2048 )) && memory=$(( memory - 1024 ))
    node=$(sed "s/RealMemory=[0-9]*/RealMemory=$memory/" <<<"$node")
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    [[ -n $cpus ]] || die "could not read the node from 'slurmd -C'"
    cat >"$CONF" <<EOF
# written by scripts/slurm-local.sh start
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$host" >"$DIR/node"
}

launch() { # name, command...: start in its own session, record the PID
    local name=$1
    shift
    setsid "$@" >"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$DIR/$name.pid"
}

start() {
    [[ $(id -u) == 0 ]] || cannot "the daemons need root (running as $(id -un))"
    if [[ -n $(pid_of slurmctld) ]]; then
        echo "slurm-local: already running; export SLURM_CONF=$CONF"
        return 0
    fi
    mkdir -p "$DIR"
    install_slurm
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
    chmod 0755 "$DIR" "$DIR/munge"  # munged refuses a socket folder others cannot reach
    if [[ ! -f $DIR/munge.key ]]; then
        mungekey --create --keyfile="$DIR/munge.key" 2>/dev/null \
            || dd if=/dev/urandom of="$DIR/munge.key" bs=1 count=128 status=none
    fi
    chmod 0600 "$DIR/munge.key"
    write_config
    local node
    node=$(<"$DIR/node")
    launch munged munged -F --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge.key" \
        --pid-file="$DIR/munged.daemon.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    for _ in $(seq 50); do [[ -S $DIR/munge/munge.socket ]] && break; sleep 0.1; done
    [[ -S $DIR/munge/munge.socket ]] || { stop; die "munged did not start, see $DIR/log/munged.out"; }
    launch slurmctld slurmctld -D -f "$CONF"
    launch slurmd slurmd -D -f "$CONF" -N "$node"
    for _ in $(seq 300); do
        if [[ $(SLURM_CONF=$CONF sinfo -h -o %t 2>/dev/null) == idle ]]; then
            echo "slurm-local: up (node $node); export SLURM_CONF=$CONF"
            return 0
        fi
        [[ -n $(pid_of slurmctld) && -n $(pid_of slurmd) ]] || break
        sleep 0.1
    done
    stop
    die "the node never became idle, see $DIR/log/"
}

stop() {
    local name pid stopped=()
    for name in slurmd slurmctld munged; do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then
            kill -TERM "$pid"
            stopped+=("$name:$pid")
        fi
    done
    for entry in "${stopped[@]}"; do
        pid=${entry#*:}
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    done
    for name in "${DAEMONS[@]}"; do rm -f "$DIR/$name.pid"; done
    echo "slurm-local: stopped ${stopped[*]:-nothing (not running)}"
}

status() {
    local name pid running=0
    for name in "${DAEMONS[@]}"; do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then echo "$name: running (pid $pid)"; running=$((running + 1)); else echo "$name: stopped"; fi
    done
    if (( running == ${#DAEMONS[@]} )); then
        SLURM_CONF=$CONF sinfo
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    return 1
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
