#!/usr/bin/env bash
# Creates or refreshes .venv with scratchlm and what a command needs:
#   bash scripts/setup.sh [EXTRAS]   (default: every optional extra, which the test suite covers;
#                                     the main job asks only for export,serve)
# torch is pinned to the 2.13.0 CPU wheel first so nothing later can pull a CUDA build;
# the package itself declares only a range (torch>=2.4) that real users can satisfy.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=${PYTHON:-python3}
extras="${1:-dev,ray,export,eval,serve}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# The stamp holds the hash of what decides the install, then the extras installed with it.
stamp=.venv/.scratchlm-installed
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
installed=""
if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$want" ]; then
    installed="$(sed -n 2p "$stamp")"
fi
missing=""
for extra in ${extras//,/ }; do
    [[ ",$installed," == *",$extra,"* ]] || missing="$missing,$extra"
done
if [ ! -f "$stamp" ] || [ "$(head -n 1 "$stamp")" != "$want" ] || [ -n "$missing" ]; then
    echo "setup: installing scratchlm and its dependencies ($extras) into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" >&2 || true
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 | grep -v "is ignored" >&2 || true
    .venv/bin/python -c "import torch, scratchlm" || { echo "setup: install failed" >&2; exit 1; }
    all="$(echo "${installed:+$installed,}$extras" | tr ',' '\n' | sort -u | paste -sd, -)"
    printf '%s\n%s\n' "$want" "$all" > "$stamp"
fi
# The web pages (the chat page of `scratchlm serve`, the run's report card) are tested in a real
# headless browser: Debian's chromium and its WebDriver, installed when missing for the tests (as
# root; elsewhere the browser tests skip, saying why).
if [[ ",$extras," == *",dev,"* ]] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "setup: installing chromium and chromium-driver (apt-get)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
            echo "setup: could not install chromium; the browser test will skip" >&2
    fi
fi
