#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and for trying the sbatch scripts:
#
#   bash tools/slurm_local.sh start [STATE_DIR]    # munge, MariaDB, slurmdbd, slurmctld, slurmd
#   bash tools/slurm_local.sh status [STATE_DIR]   # exit 0 when the node is up
#   bash tools/slurm_local.sh stop [STATE_DIR]     # stops what start started, by its pid files
#   export SLURM_CONF=STATE_DIR/slurm.conf         # then sbatch, srun, squeue, sacct, scontrol
#
# It installs nothing: it needs, as root, Debian's packages
#   apt-get install slurm-wlm slurmdbd munge libpmix-dev mariadb-server
# and writes everything else (configs, spool, state, logs, the accounting database) under
# STATE_DIR (default /tmp/mhd-slurm, or $MHD_SLURM_DIR). The config names this host with its
# cores and memory, PMIx as MpiDefault (Open MPI 5, also the PyPI wheel, speaks PMIx only: with
# pmi2 every rank would start alone), a short KillWait, and accounting through slurmdbd into a
# private MariaDB, so that sacct shows jobs, requeues and their states.
set -euo pipefail

cmd=${1:-}
state=${2:-${MHD_SLURM_DIR:-/tmp/mhd-slurm}}
cluster=mhdlocal
db_port=${MHD_SLURM_DB_PORT:-3307}
export SLURM_CONF=$state/slurm.conf

die() { echo "slurm_local: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local n=$1 what=$2; shift 2
    for _ in $(seq "$((n * 4))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    die "$what did not come up within ${n} s (logs in $state/log)"
}

need() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it starts munged, MariaDB and the SLURM daemons)"
    local missing=()
    for exe in munged slurmctld slurmd slurmdbd sacctmgr mariadbd mariadb-install-db; do
        command -v "$exe" >/dev/null 2>&1 || [ -x "/usr/sbin/$exe" ] || missing+=("$exe")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: apt-get install slurm-wlm slurmdbd munge libpmix-dev mariadb-server"
    [ -n "$(ls /usr/lib/*/slurm-wlm/mpi_pmix*.so 2>/dev/null)" ] || die "SLURM's PMIx plugin is missing: apt-get install libpmix-dev"
}

write_configs() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$state"/{spool,ctld,log,run}
    cat > "$state/slurm.conf" <<EOF
# Written by tools/slurm_local.sh: one node, this host.
ClusterName=$cluster
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
# task/affinity: each task is bound to the CPUs it was allocated, as on a cluster.
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=600
JobRequeue=1
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmdSpoolDir=$state/spool
StateSaveLocation=$state/ctld
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    cat > "$state/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$state/run/slurmdbd.pid
LogFile=$state/log/slurmdbd.log
EOF
    chmod 600 "$state/slurmdbd.conf"
}

start_munge() {
    if alive /run/munge/munged.pid; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then  # a fresh key for this machine only
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged --force
    touch "$state/run/munged.ours"
}

start_db() {
    local db=$state/mysql sock=$state/run/mysql.sock
    if ! alive "$state/run/mysql.pid"; then
        if [ ! -d "$db/mysql" ]; then
            mkdir -p "$db"
            chown mysql:mysql "$db"
            mariadb-install-db --user=mysql --datadir="$db" --auth-root-authentication-method=socket \
                > "$state/log/mariadb-install.log" 2>&1
        fi
        chown mysql:mysql "$state/run"
        mariadbd --user=mysql --datadir="$db" --socket="$sock" --pid-file="$state/run/mysql.pid" \
            --port="$db_port" --bind-address=127.0.0.1 --log-error="$state/log/mariadb.log" \
            < /dev/null > "$state/log/mariadb.out" 2>&1 &
        wait_for 60 MariaDB mariadb --socket="$sock" -u root -e "SELECT 1"
    fi
    mariadb --socket="$sock" -u root -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

node_up() {
    local s
    s=$(sinfo -h -o %t 2>/dev/null | head -n 1)
    [ "$s" = idle ] || [ "$s" = mix ] || [ "$s" = alloc ]
}

start() {
    need
    write_configs
    start_munge
    start_db
    alive "$state/run/slurmdbd.pid" || slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -Q add cluster "$cluster" >/dev/null 2>&1 || true
    alive "$state/run/slurmctld.pid" || slurmctld
    wait_for 60 slurmctld scontrol ping
    alive "$state/run/slurmd.pid" || slurmd
    wait_for 60 "the node" node_up
    echo "slurm_local: up: $(sinfo -h -o '%n %c CPUs %m MB %t') (export SLURM_CONF=$SLURM_CONF)"
}

stop() {
    local f
    for f in slurmd slurmctld slurmdbd mysql; do
        if alive "$state/run/$f.pid"; then
            # The daemon may remove its pid file meanwhile (slurmdbd does when slurmctld stops).
            kill "$(cat "$state/run/$f.pid" 2>/dev/null)" 2>/dev/null || true
            for _ in $(seq 40); do alive "$state/run/$f.pid" || break; sleep 0.25; done
        fi
    done
    if [ -f "$state/run/munged.ours" ] && alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$state/run/munged.ours"
    fi
    echo "slurm_local: stopped (state kept in $state)"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) [ -f "$SLURM_CONF" ] && node_up && echo "slurm_local: up ($SLURM_CONF)" ;;
    *) echo "usage: bash tools/slurm_local.sh start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac
