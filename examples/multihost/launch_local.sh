#!/usr/bin/env bash
# Starts N processes of one script on this machine, wired together by jax.distributed (gloo on CPU).
#   examples/multihost/launch_local.sh N SCRIPT [ARGS...]
# Each process gets JTINKER_LOCAL_DEVICES CPU devices (default 4). Exit status: the first failure.
set -euo pipefail
n=$1; shift
port=${JTINKER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu JTINKER_LOCAL_DEVICES=${JTINKER_LOCAL_DEVICES:-4} \
  JTINKER_COORDINATOR_ADDRESS=127.0.0.1:$port JTINKER_NUM_PROCESSES=$n JTINKER_PROCESS_ID=$i \
    python "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
