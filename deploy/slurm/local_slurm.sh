#!/usr/bin/env bash
# A throwaway one-node Slurm on this machine (Debian's slurmctld, slurmd and munge), for testing
# smelt.sbatch against real Slurm: `start DIR` writes the configuration under DIR and starts the
# daemons as root, printing the environment to use (SLURM_CONF); `stop DIR` ends them.
#
#   sudo apt-get install slurmd slurmctld slurm-client munge
#   eval "$(sudo deploy/slurm/local_slurm.sh start /tmp/slurm)"; sbatch ...; sudo deploy/slurm/local_slurm.sh stop /tmp/slurm
set -euo pipefail
cmd=${1:?usage: local_slurm.sh start|stop DIR}
dir=${2:?usage: local_slurm.sh start|stop DIR}

stop() {
  for pidfile in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 0.5
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi
[ "$cmd" = start ] || { echo "unknown command $cmd" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "local_slurm.sh start needs root (slurmd runs jobs as their user)" >&2; exit 1; }
for bin in slurmctld slurmd munged sbatch; do
  command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || { echo "$bin not found: apt-get install slurmd slurmctld slurm-client munge" >&2; exit 1; }
done
mkdir -p "$dir"/{state,spool,log,munge,munge-key}
# The key private to root; the socket's directory open to every user (sbatch run by a user
# authenticates through it).
chmod 700 "$dir/munge-key"
chmod 755 "$dir" "$dir/munge"
dd if=/dev/urandom of="$dir/munge-key/munge.key" bs=1 count=1024 status=none
chmod 400 "$dir/munge-key/munge.key"
/usr/sbin/munged --key-file="$dir/munge-key/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge-key/seed" --force

host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$dir/slurm.conf" <<EOF
ClusterName=smelt-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$(( 20000 + RANDOM % 20000 ))
SlurmdPort=$(( 40000 + RANDOM % 20000 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# The whole machine as one node, oversubscribed: the smelt processes of a test are light.
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
export SLURM_CONF="$dir/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF"
/usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 1 100); do
  if sinfo -h -o %T 2>/dev/null | grep -q idle; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "slurm did not come up; logs in $dir/log:" >&2
tail -n 20 "$dir"/log/*.log >&2
stop
exit 1
