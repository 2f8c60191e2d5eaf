#!/bin/sh
# One command for the whole suite: bench/run.sh [NAME ...] [--quick] [--profile]
cd "$(dirname "$0")/.." && exec .venv/bin/python -m bench "$@"
