#!/usr/bin/env bash
# The demo on a fresh machine: starts Kafka, the demo IOC and the gateway, reads a few PVs
# through Kafka over CA and PVA, then stops everything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/bootstrap.sh
state="$root/var/demo"
trap '.venv/bin/k2eg-stack stop --state-dir "$state" >/dev/null 2>&1 || true' EXIT
.venv/bin/k2eg-stack start --state-dir "$state"
eval "$(.venv/bin/k2eg-stack env --state-dir "$state")"
.venv/bin/python -m k2eg.stack.demo
