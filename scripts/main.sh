#!/usr/bin/env bash
# The main job: raw text to an instruction-tuned, evaluated, exported model with a report card
# (sets up .venv first, with the extras the run and `scratchlm serve` need).
# Arguments go to `scratchlm run` (see `scratchlm run --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" export,serve  # what the run (GGUF export) and `scratchlm serve` need
cd "$root"
exec .venv/bin/scratchlm run "$@"
