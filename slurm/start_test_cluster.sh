#!/usr/bin/env bash
# A two-node Slurm test cluster on one machine: slurmctld plus two slurmd "nodes", each node in
# its own network namespace (own address, own hostname) on a veth/bridge link made here.
#
#   root namespace   bridge mlfopbr0 10.77.0.1/24   slurmctld (SlurmctldHost=localhost(10.77.0.1))
#   netns mlfop-node1  mlfop0 10.77.0.11/24, hostname node1, slurmd -N node1
#   netns mlfop-node2  mlfop0 10.77.0.12/24, hostname node2, slurmd -N node2
#
# Only these addresses and loopback are used; nothing else is contacted. Debian's Slurm packages
# (slurmctld/slurmd/slurm-client, installed if missing), auth/none, no munge. The file system
# is shared by both nodes (as a cluster file system would be); each node
# has its own /etc/hosts (/etc/netns/<ns>/hosts), slurmd spool, pid and log file.
#
# Usage (root):
#   slurm/start_test_cluster.sh               (re)start the whole cluster; idempotent
#   slurm/start_test_cluster.sh --node node2  start one node's slurmd again (after
#                                             slurm/stop_test_cluster.sh --node node2)
#   slurm/stop_test_cluster.sh                tear everything down
# Writes /run/mlfop-test-cluster.env (node names, namespaces, addresses) for tests/test_slurm*.py.
set -euo pipefail

NET=${MLFOP_CLUSTER_NET:-10.77.0}          # /24 prefix of the cluster link
BRIDGE=mlfopbr0
IFNAME=mlfop0                              # the nodes' interface (same name on every node)
NODES=(node1 node2)
CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurmctld
LOG_DIR=/var/log/slurm
NODE_ROOT=/var/lib/mlfop-test-cluster      # per-node spool dirs live under here
ENV_FILE=/run/mlfop-test-cluster.env

node_ns() { echo "mlfop-$1"; }
node_addr() { echo "$NET.$((10 + ${1#node}))"; }

log() { echo "start_test_cluster: $*"; }

install_slurm() {
  if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client >/dev/null
  fi
  command -v ip >/dev/null 2>&1 || { apt-get install -y -qq iproute2 >/dev/null; }
}

# Bridge in the root namespace, one namespace + veth pair per node. Idempotent.
make_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local node ns host_if
  for node in "${NODES[@]}"; do
    ns=$(node_ns "$node")
    host_if="mlfop-$node"
    ip netns list | grep -qw "^$ns" || ip netns add "$ns"
    if ! ip -n "$ns" link show "$IFNAME" >/dev/null 2>&1; then
      ip link del "$host_if" 2>/dev/null || true
      ip link add "$host_if" type veth peer name "$IFNAME" netns "$ns"
    fi
    ip link set "$host_if" master "$BRIDGE" up
    ip -n "$ns" addr replace "$(node_addr "$node")/24" dev "$IFNAME"
    ip -n "$ns" link set "$IFNAME" up
    ip -n "$ns" link set lo up
    # The node's own /etc/hosts (bind-mounted by start_node): names resolve as on a cluster.
    mkdir -p "/etc/netns/$ns"
    {
      echo "127.0.0.1 localhost"
      echo "$NET.1 mlfop-ctl"
      local other
      for other in "${NODES[@]}"; do echo "$(node_addr "$other") $other"; done
    } >"/etc/netns/$ns/hosts"
  done
}

write_config() {
  mkdir -p "$CONF_DIR" "$STATE_DIR" "$LOG_DIR" "$NODE_ROOT"
  local cpus mem node_lines="" node
  cpus=$(nproc --all)  # --all: nproc alone honours OMP_NUM_THREADS
  mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / ${#NODES[@]} - 512))
  for node in "${NODES[@]}"; do
    mkdir -p "$NODE_ROOT/$node/spool"
    node_lines+="NodeName=$node NodeHostname=$node NodeAddr=$(node_addr "$node") CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
  done
  cat >"$CONF_DIR/slurm.conf" <<CONF
ClusterName=mlfop-ci
SlurmctldHost=localhost($NET.1)
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=$NODE_ROOT/%n/spool
StateSaveLocation=$STATE_DIR
SlurmUser=root
SlurmdUser=root
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
KillWait=30
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
${node_lines}PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 PriorityTier=1 GraceTime=120
PartitionName=urgent Nodes=$(IFS=,; echo "${NODES[*]}") MaxTime=INFINITE State=UP OverSubscribe=EXCLUSIVE PriorityTier=2 PreemptMode=OFF
CONF
  {
    echo "MLFOP_CLUSTER_NODES=\"${NODES[*]}\""
    echo "MLFOP_CLUSTER_IFNAME=$IFNAME"
    echo "MLFOP_CLUSTER_CTL_ADDR=$NET.1"
    for node in "${NODES[@]}"; do
      echo "MLFOP_CLUSTER_NETNS_$node=$(node_ns "$node")"
      echo "MLFOP_CLUSTER_ADDR_$node=$(node_addr "$node")"
    done
  } >"$ENV_FILE"
}

# Kill (by pid) whatever Slurm daemons a previous run left: this cluster's, or a single-node
# Slurm's (its default pid files).
stop_daemons() {
  bash "$(dirname "$0")/stop_test_cluster.sh" --daemons-only
  local pidfile pid
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

# One node's slurmd inside its network namespace, with its own hostname (UTS namespace) and
# /etc/hosts (mount namespace): the ranks it starts see hostname=<node>, the node's address and
# names. (nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts slurmd needs.)
start_node() {
  local node=$1 ns
  ns=$(node_ns "$node")
  if ip netns pids "$ns" 2>/dev/null | grep -q .; then
    log "$node: processes still running in $ns; stop them first (stop_test_cluster.sh --node $node)"
    return 1
  fi
  rm -f "/run/slurmd-$node.pid"
  nsenter --net="/run/netns/$ns" unshare --mount --propagation private --uts sh -c \
    "hostname $node && mount --bind /etc/netns/$ns/hosts /etc/hosts && exec slurmd -N $node"
}

wait_ready() {
  local want=$1 node
  for _ in $(seq 1 90); do
    local ok=1
    for node in $want; do
      sinfo -h -n "$node" -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)' || ok=0
    done
    [ "$ok" = 1 ] && { sinfo; return 0; }
    for node in $want; do
      scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    done
    sleep 1
  done
  echo "Slurm test cluster did not become ready; logs:" >&2
  tail -n 30 "$LOG_DIR/slurmctld.log" >&2 || true
  for node in $want; do tail -n 30 "$LOG_DIR/slurmd-$node.log" >&2 || true; done
  return 1
}

if [ "${1:-}" = "--node" ]; then
  node=${2:?usage: start_test_cluster.sh --node NODE}
  start_node "$node"
  wait_ready "$node"
  exit 0
fi

install_slurm
stop_daemons
make_network
write_config
slurmctld -c # -c: clear previous job state
for node in "${NODES[@]}"; do start_node "$node"; done
wait_ready "${NODES[*]}"
