#!/usr/bin/env bash
# Run one command on every host of a Cloud TPU VM pod slice, with a log per host.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--workers N] [--repo URL] [--ref REF]
#                     [--logs DIR] [--dry-run] -- CMD [ARGS...]
#
#   launch/tpu_pod.sh --tpu my-v5p-128 --zone us-east5-a -- \
#       python -m mlcd_jax.train --config=configs/mlcd_laion400m.py:L/14 --workdir=gs://bucket/l14
#
# 1. Set-up, once on all workers (`gcloud compute tpus tpu-vm ssh --worker=all`): clone --repo at
#    --ref (default: this clone's origin and branch) into ~/mlcd_jax (or update it), create ~/mlcd_jax/.venv, install the package and
#    jax[tpu] matching the pinned jax. Skipped on a worker that already has it at that ref.
# 2. The same CMD on every host (each runs it inside ~/mlcd_jax with .venv's python); jax
#    joins the hosts by itself (mlcd_jax/runtime/distributed.py). Host i's output goes to DIR/worker_i.log
#    here (default logs/tpu_NAME_<time>); the exit code is the first failing host's.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
here=$(cd "$(dirname "$0")/.." && pwd)
tpu=""; zone=""; project=""; workers=""
repo=$(git -C "$here" remote get-url origin 2>/dev/null || true)     # default: this clone's origin
ref=$(git -C "$here" rev-parse --abbrev-ref HEAD 2>/dev/null || echo main)  # and its branch
logs=""; dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (put the command after --)" >&2; usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && $# -gt 0 ]] || { echo "tpu_pod.sh: need --tpu, --zone and -- CMD" >&2; usage; }
[[ -n "$repo" ]] || { echo "tpu_pod.sh: this clone has no origin remote; pass --repo URL (a git URL the workers can clone)" >&2; exit 2; }
logs="${logs:-logs/tpu_${tpu}_$(date +%Y%m%d_%H%M%S)}"
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone"); [[ -n "$project" ]] && where+=(--project "$project")

run() {  # print (dry run) or execute
  if [[ $dry_run == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

setup=$(cat <<SETUP
set -e
if [ ! -d ~/mlcd_jax/.git ]; then git clone --quiet $repo ~/mlcd_jax; fi
cd ~/mlcd_jax && git fetch --quiet origin && git checkout --quiet $ref && git pull --quiet --ff-only || true
if [ "\$(cat .venv/.tpu-ref 2>/dev/null)" != "\$(git rev-parse HEAD)" ]; then
  python3 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e . && .venv/bin/pip install --quiet "jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
  git rev-parse HEAD > .venv/.tpu-ref
fi
SETUP
)
echo "# 1. set-up on all workers" >&2
run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$setup"

if [[ -z "$workers" ]]; then
  if [[ $dry_run == 1 ]]; then
    echo "# workers: from the line below (or pass --workers N); showing worker 0" >&2
    run "${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" --format="value(networkEndpoints.len())"
    workers=1
  else
    workers=$("${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" --format="value(networkEndpoints.len())")
  fi
fi
command="cd ~/mlcd_jax && PATH=\$HOME/mlcd_jax/.venv/bin:\$PATH $(printf '%q ' "$@")"
echo "# 2. the command on each of $workers workers, logs in $logs/worker_<i>.log" >&2
[[ $dry_run == 1 ]] || mkdir -p "$logs"
pids=()
for ((i = 0; i < workers; i++)); do
  if [[ $dry_run == 1 ]]; then
    run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker="$i" --command="$command"
    echo "#   > $logs/worker_$i.log 2>&1 &" >&2
  else
    "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker="$i" --command="$command" \
      > "$logs/worker_$i.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for i in "${!pids[@]}"; do
  rc=0; wait "${pids[$i]}" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "tpu_pod.sh: worker $i exited $rc; see $logs/worker_$i.log" >&2
    [[ $status -eq 0 ]] && status=$rc
  fi
done
exit $status
