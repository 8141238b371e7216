#!/usr/bin/env bash
# make cluster-up    (or: cluster/local/ray-up.sh)
#
# Starts a single-node Ray head on this machine, the local stand-in for a KubeRay RayCluster.
# Jobs then run on it with the same command as on any cluster:
#   ray job submit --address http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265} --working-dir . -- \
#       python ray_jobs/dedup_exact.py --config ray_jobs/configs/dedup_exact/local.yaml
# or attach a script directly with RAY_ADDRESS=auto.
set -euo pipefail
VENV=${VENV:-.venv}
RAY="$VENV/bin/ray"
# Jobs run `python ...` with the head's PATH: make that the venv's python, as if it were activated.
export PATH="$(cd "$VENV/bin" && pwd):$PATH"
port=${RAY_PORT:-6379}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}
num_cpus=${RAY_NUM_CPUS:-$(nproc)}

if "$RAY" status --address "127.0.0.1:$port" >/dev/null 2>&1; then
  echo "Ray head already running at 127.0.0.1:$port"
else
  # Warm worker processes for Ray Data's shuffles (workloads/common/ray_runtime.py:
  # local_system_config): four per CPU, idle for up to a minute.
  RAY_num_workers_soft_limit=$((4 * num_cpus)) RAY_idle_worker_killing_time_threshold_ms=60000 \
  "$RAY" start --head --port "$port" --num-cpus "$num_cpus" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --disable-usage-stats
fi
echo
echo "dashboard and job API: http://127.0.0.1:$dashboard_port"
echo "Ray turns on token auth for this head (token in ~/.ray/auth_token); clients send it in token mode:"
echo "submit a job:  RAY_AUTH_MODE=token $RAY job submit --address http://127.0.0.1:$dashboard_port --working-dir . -- \\"
echo "                 python ray_jobs/dedup_exact.py --config ray_jobs/configs/dedup_exact/local.yaml"
