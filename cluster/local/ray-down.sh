#!/usr/bin/env bash
# make cluster-down    (or: cluster/local/ray-down.sh)
# Stops the Ray processes that `make cluster-up` started on this machine.
set -euo pipefail
VENV=${VENV:-.venv}
"$VENV/bin/ray" stop
