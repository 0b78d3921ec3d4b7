#!/usr/bin/env bash
# A real one-node Slurm cluster for the Slurm tests, started by hand (no systemd), never touching
# /etc/slurm: another cluster may already run on this machine's default ports.
#
#   source .ci/slurm.sh up     # installs slurm-wlm + munge if missing, starts munged, slurmctld and
#                              # slurmd on free ports, waits for the node; exports SLURM_CONF and
#                              # SEQPAR_SLURM_TESTS=required; the state lives in $SEQPAR_SLURM_DIR
#   bash .ci/slurm.sh down     # stops the daemons it started, by pid
#
# Needs root (CI runs as root) and Debian's package registry.
set -uo pipefail

_slurm_log() { echo "[slurm] $*" >&2; }

# Two ports for the daemons, which need them fixed in slurm.conf: free now, and below the kernel's
# ephemeral range, so no other process's outgoing connection or port-0 bind takes them before the
# daemons bind them (only an explicit bind could; _slurm_up then retries with other ports).
_slurm_free_ports() {
    python3 - <<'PY'
import random, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
chosen = []
while len(chosen) < 2:
    port = random.randrange(10000, max(10001, low - 1))
    if port in chosen:
        continue
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
    chosen.append(port)
print(*chosen)
PY
}

_slurm_install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    _slurm_log "installing slurm-wlm and munge"
    # keep the packages from starting their services: we start the daemons ourselves
    local rc_d=/usr/sbin/policy-rc.d had_rc_d=0
    [[ -e $rc_d ]] && had_rc_d=1
    [[ $had_rc_d == 0 ]] && printf '#!/bin/sh\nexit 101\n' > "$rc_d" && chmod +x "$rc_d"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    local rc=$?
    [[ $had_rc_d == 0 ]] && rm -f "$rc_d"
    return $rc
}

_slurm_write_conf() {  # _slurm_write_conf DIR CTLD_PORT D_PORT CPUS MEM_MB
    local dir=$1 ctld_port=$2 d_port=$3 cpus=$4 mem=$5
    cat > "$dir/slurm.conf" <<EOF
ClusterName=seqpar-ci
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
JobRequeue=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

_slurm_kill_pidfiles() {  # TERM, then KILL a second later, the processes named by these pid files (ours only)
    local f
    for f in "$@"; do
        [[ -s $f ]] && kill "$(cat "$f")" 2>/dev/null || true
    done
    sleep 1
    for f in "$@"; do
        [[ -s $f ]] && kill -9 "$(cat "$f")" 2>/dev/null || true
    done
    return 0
}

_slurm_up() {
    local t0=$SECONDS
    _slurm_install || { _slurm_log "could not install slurm-wlm and munge"; return 1; }
    local dir
    dir=$(mktemp -d /tmp/seqpar-slurm.XXXXXX)
    chmod 755 "$dir"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    # munge: one per machine, on its default socket; start it only if none answers
    if ! munge -n </dev/null >/dev/null 2>&1; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
        if [[ ! -s /etc/munge/munge.key ]]; then
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
            chown munge:munge /etc/munge/munge.key 2>/dev/null || true
            chmod 400 /etc/munge/munge.key
        fi
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force
        else
            /usr/sbin/munged --force
        fi
        sleep 1
        pgrep -n munged > "$dir/munged.pid"
    fi
    munge -n </dev/null | unmunge >/dev/null || { _slurm_log "munge does not work"; return 1; }
    local cpus mem ctld_port d_port attempt deadline state=""
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    export SLURM_CONF="$dir/slurm.conf" SEQPAR_SLURM_DIR="$dir" SEQPAR_SLURM_TESTS=required
    for attempt in 1 2 3; do
        read -r ctld_port d_port < <(_slurm_free_ports)
        _slurm_write_conf "$dir" "$ctld_port" "$d_port" "$cpus" "$mem"
        if /usr/sbin/slurmctld -f "$SLURM_CONF" && /usr/sbin/slurmd -f "$SLURM_CONF" -N localhost; then
            deadline=$(( SECONDS + 60 ))
            while (( SECONDS < deadline )); do
                # bounded: where another process holds the port, sinfo may wait on it for a long time
                state=$(timeout 5 sinfo -h -n localhost -o %T 2>/dev/null | head -1) || state=""
                [[ $state == idle ]] && break
                sleep 1
            done
        fi
        [[ $state == idle ]] && break
        _slurm_log "attempt $attempt: the node is '${state:-unreachable}', not idle, after 60 s (ports $ctld_port, $d_port)"
        tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 2>/dev/null || true
        _slurm_kill_pidfiles "$dir"/slurmd-*.pid "$dir/slurmctld.pid"
        rm -f "$dir"/slurmd-*.pid "$dir/slurmctld.pid"
        rm -rf "${dir:?}/state"/* "${dir:?}/spool"/*
    done
    [[ $state == idle ]] || { _slurm_log "the cluster did not come up in 3 attempts"; return 1; }
    _slurm_log "up in $(( SECONDS - t0 )) s: SLURM_CONF=$SLURM_CONF (slurmctld :$ctld_port, slurmd :$d_port, $cpus CPUs)"
}

_slurm_down() {
    local dir=${SEQPAR_SLURM_DIR:-}
    [[ -n $dir && -d $dir ]] || return 0
    _slurm_kill_pidfiles "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"
    _slurm_log "stopped the daemons of $dir"
}

case "${1:-}" in
    up) _slurm_up ;;
    down) _slurm_down ;;
    *) echo "usage: source .ci/slurm.sh up | bash .ci/slurm.sh down" >&2; false ;;
esac
