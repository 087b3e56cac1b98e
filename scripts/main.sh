#!/usr/bin/env bash
# The main job: raw text to a trained, evaluated model with a report card (sets up .venv first).
# Arguments go to `scratchlm run` (see `scratchlm run --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/scratchlm run "$@"
