#!/usr/bin/env bash
# Start (or stop) a one-machine Ray head for trying `ray job submit` locally.
#   cluster/local_head.sh start   # dashboard/job API on 127.0.0.1:8265 only
#   cluster/local_head.sh stop
set -euo pipefail
# The head must run in the project's virtualenv: a submitted job's `python` is the head's.
VENV="$(cd "$(dirname "$0")/.." && pwd)/.venv"
export PATH="$VENV/bin:$PATH"
RAY="${RAY:-$VENV/bin/ray}"
case "${1:-start}" in
  start)
    # More logical CPUs than cores: each engine actor holds one CPU for a whole stage.
    cpus=$(( $(nproc) * 2 > 4 ? $(nproc) * 2 : 4 ))
    "$RAY" start --head --num-cpus "$cpus" --dashboard-host 127.0.0.1 --dashboard-port 8265 --disable-usage-stats
    echo "submit with: ray job submit --address http://127.0.0.1:8265 --working-dir . -- python ray_jobs/run_pipeline.py --config configs/demo.yaml"
    ;;
  stop)
    "$RAY" stop
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
