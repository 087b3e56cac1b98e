#!/usr/bin/env bash
# Runs the whole test suite (sets up .venv first).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
# One torch thread per test process: pytest-xdist already runs one process per core, and
# oversubscribed threads make small CPU kernels many times slower.
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
