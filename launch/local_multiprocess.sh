#!/usr/bin/env bash
# N processes of one multi-host job on this machine (127.0.0.1), each with its own simulated CPU
# devices: for tests, and for trying multi-host behaviour on a laptop.
#
#   launch/local_multiprocess.sh -n 2 [-d 4] [-p PORT] [--logs DIR] [--dry-run] -- CMD [ARGS...]
#   launch/local_multiprocess.sh -n 2 -- python -m mlcd_jax.train --config=configs/test_tiny.py --workdir=/tmp/mp
#
# Every process runs CMD with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set
# (mlcd_jax/runtime/distributed.py reads them), JAX_PLATFORMS=cpu and -d simulated devices (added to the
# caller's XLA_FLAGS, which are kept). Process 0 prints to this terminal; every process's output
# goes to DIR/process_<i>.log (default: a temporary folder). If any process fails, the others are stopped and the first failure's exit code is returned.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
n=""; devices=4; port=""; logs=""; dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "local_multiprocess.sh: unknown option $1 (put the command after --)" >&2; usage ;;
  esac
done
[[ -n "$n" && "$n" -ge 1 && $# -gt 0 ]] || { echo "local_multiprocess.sh: need -n N and -- CMD" >&2; usage; }
if [[ -z "$port" ]]; then  # a free port, chosen by the OS
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
logs="${logs:-$(mktemp -d -t mlcd_mp.XXXXXX)}"

env_for() {
  echo "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$1" \
       "JAX_PLATFORMS=cpu"
}
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    echo "env $(env_for "$i") XLA_FLAGS=$(printf '%q' "$XLA_FLAGS") $(printf '%q ' "$@")> $logs/process_$i.log 2>&1 &"
  done
  exit 0
fi

mkdir -p "$logs"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < n; i++)); do
  : > "$logs/process_$i.log"  # exists before tail follows it
  # shellcheck disable=SC2046
  env $(env_for "$i") "$@" > "$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$logs/process_0.log" --pid "${pids[0]}" &
tailer=$!
status=0
done_=()
while [[ ${#done_[@]} -lt $n ]]; do  # poll; the first failure stops the rest
  for ((i = 0; i < n; i++)); do
    [[ " ${done_[*]-} " == *" $i "* ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0; wait "${pids[$i]}" || rc=$?
    done_+=("$i")
    if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; cleanup; fi
  done
  sleep 0.2
done
wait "$tailer" 2>/dev/null || true
if [[ $status -ne 0 ]]; then
  echo "local_multiprocess.sh: a process failed (exit $status); logs in $logs" >&2
  for ((i = 0; i < n; i++)); do echo "--- process $i (last lines)" >&2; tail -n 5 "$logs/process_$i.log" >&2; done
fi
echo "local_multiprocess.sh: logs in $logs" >&2
exit $status
