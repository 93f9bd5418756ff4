#!/usr/bin/env bash
# Tear down the two-node test cluster of slurm/start_test_cluster.sh (idempotent).
#
#   slurm/stop_test_cluster.sh                everything: jobs, daemons, namespaces, bridge
#   slurm/stop_test_cluster.sh --node node2   "node failure": SIGKILL every process of that node
#                                             (its slurmd, slurmstepd and ranks), nothing else;
#                                             start_test_cluster.sh --node node2 brings it back
#   slurm/stop_test_cluster.sh --daemons-only stop the daemons, keep the network
#
# Processes are found by pid only: the node namespaces' pids (ip netns pids) and slurmctld's pid
# file.
set -uo pipefail

BRIDGE=mlfopbr0
NODES=(node1 node2)
ENV_FILE=/run/mlfop-test-cluster.env

node_ns() { echo "mlfop-$1"; }

# Signal every process in a namespace; returns once none is left (or after ~5 s).
kill_ns() {
  local ns=$1 sig=$2 pids
  ip netns list 2>/dev/null | grep -qw "^$ns" || return 0
  for _ in $(seq 1 50); do
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086
    kill "-$sig" $pids 2>/dev/null
    sleep 0.1
  done
  pids=$(ip netns pids "$ns" 2>/dev/null)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null
}

if [ "${1:-}" = "--node" ]; then
  node=${2:?usage: stop_test_cluster.sh --node NODE}
  kill_ns "$(node_ns "$node")" KILL
  rm -f "/run/slurmd-$node.pid"
  exit 0
fi

# Jobs first (their ranks live in the node namespaces), then the daemons.
if [ -f "$ENV_FILE" ] && command -v scancel >/dev/null 2>&1; then
  timeout 10 scancel --full --quiet --user=root 2>/dev/null
fi
for node in "${NODES[@]}"; do
  kill_ns "$(node_ns "$node")" TERM
  rm -f "/run/slurmd-$node.pid"
done
pid=$(cat /run/slurmctld.pid 2>/dev/null)
if [ -n "$pid" ] && [ -f "$ENV_FILE" ] && kill -0 "$pid" 2>/dev/null; then
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f /run/slurmctld.pid
fi
[ "${1:-}" = "--daemons-only" ] && exit 0

for node in "${NODES[@]}"; do
  ns=$(node_ns "$node")
  ip netns del "$ns" 2>/dev/null # removes the veth pair with it
  ip link del "mlfop-$node" 2>/dev/null
  rm -rf "/etc/netns/$ns"
done
ip link del "$BRIDGE" 2>/dev/null
rm -f "$ENV_FILE"
exit 0
