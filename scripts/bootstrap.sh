#!/usr/bin/env bash
# Creates .venv with k2eg and everything the tests, demo and benchmarks need.
# Idempotent: a second run only checks that the install is current.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.k2eg-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# The archive's PostgreSQL tests start a throwaway cluster with the server tools (initdb, pg_ctl).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get install -y -q postgresql-15 || { apt-get update -q && apt-get install -y -q postgresql; }; } >/dev/null \
      || echo "bootstrap: could not install PostgreSQL; the archive's PostgreSQL tests will fail" >&2
  else
    echo "bootstrap: PostgreSQL (initdb) is missing; install it for the archive's PostgreSQL tests" >&2
  fi
fi
