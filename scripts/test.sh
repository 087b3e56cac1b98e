#!/usr/bin/env bash
# Runs the whole test suite (sets up .venv first).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
